// The circles playground: JSON-RPC 2.0 over a WebSocket. Two ways to sign in:
// - a browser wallet (window.ethereum, EIP-1193), the default where there is one: it signs the
//   nonce with personal_sign and the server recovers the signer's key; the page holds no key;
// - a development key, for a local server and no wallet: a throw-away secp256k1 key made here and
//   kept in localStorage, signing the nonce as ECDSA over SHA-256 (64-byte compact, low-S) with
//   @noble/curves (noble-secp256k1.js, vendored by scripts/vendor-noble).
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const DEV_KEY_STORAGE = 'circles-playground-development-key';
  // The WebSocket subprotocol of our contract (circles/common/wire.py SUBPROTOCOLS; a test holds them equal).
  const SUBPROTOCOL = 'circles-gateway.v1';

  class RPCError extends Error {
    constructor(error) {
      super(String(error.message));
      this.code = error.code;
      this.data = error.data;
    }
  }

  // A failure of the connection itself: kind 'url' (not a WebSocket URL), 'connect' (closed
  // before it opened), 'lost' (closed before a reply came).
  class ConnectionError extends Error {
    constructor(kind, url, detail, method) {
      super(detail);
      this.kind = kind;
      this.url = url;
      this.method = method;
    }
  }

  // -- one WebSocket, requests matched to replies by id --------------------------------------
  let socket = null;
  let opening = null;
  let nextId = 1;
  const pending = new Map();

  function connect(url) {
    if (socket && socket.url === url && socket.readyState === WebSocket.OPEN) return Promise.resolve(socket);
    if (opening && opening.url === url) return opening.promise;
    if (socket) disconnect();
    let ws;
    try {
      // Browsers resolve a relative URL against the page; a circle URL is always absolute.
      if (!/^wss?:\/\/[^/]/i.test(url)) throw new Error(`${JSON.stringify(url)} does not start with ws:// or wss://`);
      // Our contract ({output}, -32005, ...) even on a server run with --api circles.
      ws = new WebSocket(url, [SUBPROTOCOL]);
    } catch (error) {
      return Promise.reject(new ConnectionError('url', url, String(error.message || error)));
    }
    setStatus('connecting…');
    const promise = new Promise((resolve, reject) => {
      ws.onopen = () => { opening = null; socket = ws; setStatus('connected'); resolve(ws); };
      ws.onerror = () => {}; // onclose follows with the code
      ws.onclose = (event) => {
        const why = `the WebSocket closed with code ${event.code}${event.reason ? ' (' + event.reason + ')' : ''}`;
        if (opening && opening.promise === promise) {
          opening = null;
          setStatus('not connected');
          reject(new ConnectionError('connect', url, why));
        }
        for (const [id, call] of pending) {
          if (call.ws === ws) { pending.delete(id); call.reject(new ConnectionError('lost', url, why, call.method)); }
        }
        if (socket === ws) { socket = null; setIdentity(null); setStatus('disconnected'); }
      };
      ws.onmessage = (event) => {
        let reply;
        try { reply = JSON.parse(event.data); } catch (e) { return; }
        const call = pending.get(reply.id);
        if (!call) return;
        pending.delete(reply.id);
        if (reply.error) call.reject(new RPCError(reply.error)); else call.resolve(reply.result);
      };
    });
    opening = { url, promise };
    return promise;
  }

  // Close the connection (and with it the session's authentication).
  function disconnect() {
    if (socket) socket.close(1000);
    socket = null;
    setIdentity(null);
  }

  async function call(method, params) {
    const ws = await connect($('url').value.trim());
    const id = nextId++;
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject, method, ws });
      const request = { jsonrpc: '2.0', id, method };
      if (params !== undefined) request.params = params;
      ws.send(JSON.stringify(request));
    });
  }

  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  const utf8 = (text) => new TextEncoder().encode(text);

  // -- the wallet ----------------------------------------------------------------------------
  // personal_sign takes the message as 0x-hex of its bytes (EIP-1474 DATA): unambiguous for
  // every wallet, whereas a bare string of hex digits (a nonce) may be read either way.
  async function signInWithWallet() {
    if (!window.ethereum) throw new Error('no browser wallet found (window.ethereum)');
    const accounts = await window.ethereum.request({ method: 'eth_requestAccounts' });
    if (!accounts || !accounts.length) throw new Error('the wallet shared no account');
    const account = accounts[0];
    const { nonce } = await call('fetch_nonce');
    setStatus('waiting for the wallet to sign…');
    const signature = await window.ethereum.request({ method: 'personal_sign', params: [`0x${hex(utf8(nonce))}`, account] });
    const result = await call('authenticate', { signature });
    setIdentity(result.pubkey, `wallet ${account}`);
    signedIn();
  }

  // -- the development key -------------------------------------------------------------------
  // localStorage when the browser allows it; else (storage disabled) for this page's life only.
  let devKeyInMemory = null;

  function storedDevKey() {
    let value = devKeyInMemory;
    try { value = localStorage.getItem(DEV_KEY_STORAGE) || devKeyInMemory; } catch (e) { /* storage off */ }
    if (!value || !/^[0-9a-f]{64}$/.test(value)) return null;
    const key = Uint8Array.from(value.match(/../g), (b) => parseInt(b, 16));
    return secp().utils.isValidSecretKey(key) ? key : null;
  }

  function makeDevKey() {
    const key = secp().utils.randomSecretKey(); // crypto.getRandomValues
    devKeyInMemory = hex(key);
    try { localStorage.setItem(DEV_KEY_STORAGE, devKeyInMemory); devKeyInMemory = null; } catch (e) { /* storage off */ }
    return key;
  }

  function secp() {
    if (!window.nobleSecp256k1) throw new Error('the signing library (noble-secp256k1.js) did not load');
    return window.nobleSecp256k1.secp256k1;
  }

  async function signInWithDevKey() {
    const key = storedDevKey() || makeDevKey();
    const pubkey = hex(secp().getPublicKey(key, true));
    showDevKey();
    const { nonce } = await call('fetch_nonce', { pubkey });
    // ECDSA over SHA-256 of the nonce's UTF-8 bytes (noble's default prehash), compact r||s, low-S.
    const signature = hex(secp().sign(utf8(nonce), key));
    const result = await call('authenticate', { pubkey, signature, nonce });
    setIdentity(result.pubkey, 'development key');
    signedIn();
  }

  function forgetDevKey() {
    const wasSignedIn = $('identity').dataset.via === 'development key';
    devKeyInMemory = null;
    try { localStorage.removeItem(DEV_KEY_STORAGE); } catch (e) { /* storage off */ }
    if (wasSignedIn) disconnect(); // the session was authenticated as that key
    showDevKey();
    setStatus(wasSignedIn ? 'development key forgotten, signed out' : 'development key forgotten');
  }

  function showDevKey() {
    let text = 'No development key in this browser.';
    let key = null;
    try { key = storedDevKey(); } catch (e) { text = `The signing library did not load: ${e.message}`; }
    if (key) text = `Development key in this browser, public key ${hex(secp().getPublicKey(key, true))}.`;
    $('devkey-status').textContent = text;
    $('devkey-status').dataset.pubkey = key ? hex(secp().getPublicKey(key, true)) : '';
    $('forget-dev').disabled = !key;
  }

  // -- playing -------------------------------------------------------------------------------
  async function play() {
    showOutput('', 'running');
    setStatus('playing…');
    const result = await call('play', { script: $('script').value });
    showOutput(result.output, 'done');
    setStatus('played');
  }

  // -- errors, in words for a person ---------------------------------------------------------
  // {message, detail}: what happened and what to do, then the technical detail (code, message,
  // data) for whoever wants it.
  function describeError(error) {
    if (error instanceof RPCError) {
      const data = error.data === undefined || error.data === null ? ''
        : typeof error.data === 'string' ? error.data : JSON.stringify(error.data, null, 2);
      const detail = `error ${error.code}: ${error.message}${data ? '\n' + data : ''}`;
      return { message: rpcMessage(error.code, error.data), detail };
    }
    if (error instanceof ConnectionError) {
      if (error.kind === 'url') {
        return { message: 'That is not a circle URL: it looks like wss://host:port/<circle key> (or ws:// without TLS).', detail: error.message };
      }
      if (error.kind === 'connect') {
        return {
          message: `Cannot connect to ${error.url}. Check that the server is running and that the circle key in the URL is one it serves.`,
          detail: `${error.message} before it opened (an unknown circle is refused at the handshake)`,
        };
      }
      const unsure = error.method === 'play' ? ' The script may or may not have run.' : ' Try again.';
      return { message: `The connection to the server was lost before it answered.${unsure}`, detail: `${error.message} while waiting for the reply to ${error.method}` };
    }
    if (error && error.code === 4001) return { message: 'You declined the request in the wallet.', detail: String(error.message || '') };
    if (error && typeof error.code === 'number') return { message: 'The wallet could not do it.', detail: `wallet error ${error.code}: ${error.message}` };
    return { message: `Something went wrong: ${(error && error.message) || error}`, detail: '' };
  }

  function rpcMessage(code, data) {
    switch (code) {
      case -32001: return 'Sign in first: this circle plays scripts only for signed-in users.';
      case -32002: return 'Sign-in failed: the server did not accept the signature. Sign in again.';
      case -32003: return 'The script took too long and was stopped.';
      case -32004: return 'No worker can run scripts right now (the script backend is unavailable). Try again in a moment.';
      case -32005: return 'The script failed.';
      case -32006:
        if (data && data.size && data.limit) return `The script is too large to play (${data.size} bytes; the limit is ${data.limit}).`;
        return 'Too many requests at once: wait a moment and try again.';
      case -32007: {
        const sizes = data && data.size && data.limit ? ` (${data.size} bytes; the limit is ${data.limit})` : '';
        return `The result is too large to send back${sizes}.`;
      }
      case -32008: return 'No worker is running scripts for this circle right now. Try again once one is started.';
      case -32009: return 'This circle plays scripts for its members only, and the signed-in key is not one of them.';
      case -32603: return 'The server had an internal error; its log says more.';
      case -32700: case -32600: case -32601: case -32602:
        return 'The server did not understand the request: this page and the server may be of different versions.';
      default: return 'The server answered with an error.';
    }
  }

  // -- the page ------------------------------------------------------------------------------
  function setStatus(text) {
    $('status').textContent = text;
    $('status').dataset.state = text === 'failed' || text === 'sign-in failed' ? 'failed' : '';
  }

  // Whether the server that served this page plays scripts for signed-in users only (--auth): it
  // says so in the page (<body data-auth="required">). Play then waits for a sign-in.
  const authRequired = document.body.dataset.auth === 'required';
  const SIGN_IN_FIRST = 'Sign in first: this server plays scripts for signed-in users only.';

  function setIdentity(pubkey, via) {
    $('identity').textContent = pubkey ? `signed in as ${pubkey} (${via})`
      : authRequired ? `not signed in. ${SIGN_IN_FIRST}` : 'not signed in';
    $('identity').dataset.pubkey = pubkey || '';
    $('identity').dataset.via = pubkey ? via : '';
    updatePlay();
  }

  function updatePlay() {
    const waiting = authRequired && !$('identity').dataset.pubkey;
    if (waiting || $('run').dataset.busy !== 'true') $('run').disabled = waiting;
    $('run').title = waiting ? SIGN_IN_FIRST : '';
  }

  function signedIn() {
    clearError();
    setStatus('signed in');
  }

  function showOutput(text, state) {
    $('output').textContent = text;
    $('output').dataset.state = state;
    clearError();
  }

  function clearError() {
    $('error').hidden = true;
    $('error-message').textContent = '';
    $('error-detail').textContent = '';
  }

  function showError(error, status) {
    const { message, detail } = describeError(error);
    $('error-message').textContent = message;
    $('error-detail').textContent = detail;
    $('error').hidden = false;
    if ($('output').dataset.state === 'running') $('output').dataset.state = 'error';
    $('error').dataset.at = String(Date.now());
    setStatus(status);
  }

  function busy(button, action, failedStatus) {
    return async () => {
      button.disabled = true;
      button.dataset.busy = 'true';
      try { await action(); } catch (error) { showError(error, failedStatus); } finally {
        button.disabled = false;
        button.dataset.busy = '';
        updatePlay();
      }
    };
  }

  function defaultUrl() {
    const circle = new URLSearchParams(location.search).get('circle') || '';
    return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/${circle}`;
  }

  // The wallet is the default where there is one; without one, the development key is.
  const hasWallet = Boolean(window.ethereum);
  $('signin').hidden = !hasWallet;
  $('no-wallet').hidden = hasWallet;
  $('signin-dev').classList.toggle('secondary', hasWallet);

  $('url').value = defaultUrl();
  $('signin').addEventListener('click', busy($('signin'), signInWithWallet, 'sign-in failed'));
  $('signin-dev').addEventListener('click', busy($('signin-dev'), signInWithDevKey, 'sign-in failed'));
  $('forget-dev').addEventListener('click', forgetDevKey);
  $('run').addEventListener('click', busy($('run'), play, 'failed'));
  setIdentity(null);
  showDevKey();
  // For the tests and the curious: the words the page uses for each error (no keys here).
  window.circlesPlayground = Object.freeze({ describeError: (code, message, data) => describeError(new RPCError({ code, message, data })) });
  document.body.dataset.ready = 'true';
})();
