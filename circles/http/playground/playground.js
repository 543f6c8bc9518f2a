// The circles playground: JSON-RPC 2.0 over a WebSocket, signing by the browser wallet.
// No keys and no cryptography here: window.ethereum (EIP-1193) signs the nonce with
// personal_sign, and the server recovers the signer's key from the signature.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);

  class RPCError extends Error {
    constructor(error) {
      super(String(error.message));
      this.code = error.code;
      this.data = error.data;
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
    if (socket) socket.close(1000);
    setStatus('connecting…');
    const ws = new WebSocket(url);
    const promise = new Promise((resolve, reject) => {
      ws.onopen = () => { opening = null; socket = ws; setStatus('connected'); resolve(ws); };
      ws.onerror = () => {}; // onclose follows with the code
      ws.onclose = (event) => {
        const why = `connection closed (code ${event.code}${event.reason ? ': ' + event.reason : ''})`;
        if (opening && opening.promise === promise) {
          opening = null;
          reject(new Error(`cannot connect to ${url}: ${why}`));
        }
        for (const [id, call] of pending) {
          if (call.ws === ws) { pending.delete(id); call.reject(new Error(`${why} before the reply to ${call.method} arrived`)); }
        }
        if (socket === ws) { socket = null; setIdentity(null); setStatus(why); }
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

  // -- the wallet ----------------------------------------------------------------------------
  // personal_sign takes the message as 0x-hex of its bytes (EIP-1474 DATA): unambiguous for
  // every wallet, whereas a bare string of hex digits (a nonce) may be read either way.
  function utf8Hex(text) {
    return '0x' + Array.from(new TextEncoder().encode(text), (b) => b.toString(16).padStart(2, '0')).join('');
  }

  async function signIn() {
    if (!window.ethereum) throw new Error('no browser wallet found (window.ethereum): install one to sign in');
    const accounts = await window.ethereum.request({ method: 'eth_requestAccounts' });
    if (!accounts || !accounts.length) throw new Error('the wallet shared no account');
    const account = accounts[0];
    const { nonce } = await call('fetch_nonce');
    setStatus('waiting for the wallet to sign…');
    const signature = await window.ethereum.request({ method: 'personal_sign', params: [utf8Hex(nonce), account] });
    const result = await call('authenticate', { signature });
    setIdentity(result.pubkey, account);
    setStatus('signed in');
    return result;
  }

  async function play() {
    showOutput('', 'running');
    const result = await call('play', { script: $('script').value });
    showOutput(result.output, 'done');
    setStatus('played');
  }

  // -- the page ------------------------------------------------------------------------------
  function setStatus(text) { $('status').textContent = text; }

  function setIdentity(pubkey, account) {
    $('identity').textContent = pubkey ? `signed in as ${pubkey} (wallet ${account})` : 'not signed in';
    $('identity').dataset.pubkey = pubkey || '';
  }

  function showOutput(text, state) {
    $('output').textContent = text;
    $('output').dataset.state = state;
    $('error').hidden = true;
    $('error').textContent = '';
  }

  function showError(error) {
    let text = error instanceof RPCError ? `error ${error.code}: ${error.message}` : `error: ${error.message || error}`;
    if (error instanceof RPCError && error.data !== undefined && error.data !== null) {
      text += '\n' + (typeof error.data === 'string' ? error.data : JSON.stringify(error.data, null, 2));
    }
    $('error').textContent = text;
    $('error').hidden = false;
    $('output').dataset.state = 'error';
  }

  function busy(button, action) {
    return async () => {
      button.disabled = true;
      try { await action(); } catch (error) { showError(error); } finally { button.disabled = false; }
    };
  }

  function defaultUrl() {
    const circle = new URLSearchParams(location.search).get('circle') || '';
    return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/${circle}`;
  }

  $('url').value = defaultUrl();
  $('signin').addEventListener('click', busy($('signin'), signIn));
  $('run').addEventListener('click', busy($('run'), play));
  document.body.dataset.ready = 'true';
})();
