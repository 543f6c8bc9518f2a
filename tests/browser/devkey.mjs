// Drives the playground in headless Chromium with no wallet: the development key signs in, plays,
// survives a reload and is forgotten; the errors a person meets are in words and clear after a
// success. Prints a JSON report on stdout.
// Usage: node devkey.mjs PAGE_URL SCREENSHOT_PATH   (env: SCRIPT, BAD_SCRIPT, UNKNOWN_CIRCLE_URL)
import { withPage } from './chromium.mjs';

const [pageUrl, screenshot] = process.argv.slice(2);
const STORAGE = 'circles-playground-development-key';

// What the page shows after an action settles: status, error (if shown), identity.
async function state(page) {
  return page.evaluate(() => ({
    status: document.querySelector('#status').textContent,
    errorShown: !document.querySelector('#error').hidden,
    errorMessage: document.querySelector('#error-message').textContent,
    errorDetail: document.querySelector('#error-detail').textContent,
    output: document.querySelector('#output').textContent,
    outputState: document.querySelector('#output').dataset.state,
    pubkey: document.querySelector('#identity').dataset.pubkey,
    identity: document.querySelector('#identity').textContent,
    playDisabled: document.querySelector('#run').disabled,
    playTitle: document.querySelector('#run').title,
  }));
}

async function play(page, script, outcome) {
  await page.fill('#script', script);
  await page.evaluate(() => { document.querySelector('#output').dataset.state = 'empty'; });
  await page.click('#run');
  await page.waitForSelector(`#output[data-state="${outcome}"]`);
  await page.waitForFunction(() => document.querySelector('#run').dataset.busy !== 'true');
  return state(page);
}

async function signIn(page) {
  await page.evaluate(() => { document.querySelector('#identity').dataset.pubkey = ''; });
  await page.click('#signin-dev');
  await page.waitForSelector('#signin-dev:not([disabled])');
  await page.waitForFunction(() => document.querySelector('#identity').dataset.pubkey || !document.querySelector('#error').hidden);
  return state(page);
}

await withPage(async (page, report) => {
  await page.goto(pageUrl);
  await page.waitForSelector('body[data-ready="true"]');
  report.url = await page.inputValue('#url');
  report.walletButtonShown = await page.isVisible('#signin');
  report.noWalletShown = await page.isVisible('#no-wallet');
  report.devkeyNotice = await page.textContent('#devkey');
  report.storedBefore = await page.evaluate((k) => localStorage.getItem(k), STORAGE);

  // Under --auth, Play waits for a sign-in (it was enabled, and answered -32001).
  report.beforeSignIn = await state(page);
  report.signIn = await signIn(page);
  report.storedKey = await page.evaluate((k) => localStorage.getItem(k), STORAGE);
  report.devkeyStatusPubkey = await page.getAttribute('#devkey-status', 'data-pubkey');
  report.played = await play(page, process.env.SCRIPT, 'done');
  report.failed = await play(page, process.env.BAD_SCRIPT, 'error');
  await page.screenshot({ path: screenshot, fullPage: true });
  report.playedAgain = await play(page, process.env.SCRIPT, 'done');
  report.keyInPage = await page.evaluate((key) => document.documentElement.outerHTML.includes(key), report.storedKey);

  await page.reload();
  await page.waitForSelector('body[data-ready="true"]');
  report.afterReload = await signIn(page);

  await page.click('#forget-dev');
  report.forgotten = await state(page);
  report.storedAfterForget = await page.evaluate((k) => localStorage.getItem(k), STORAGE);
  report.forgetDisabled = await page.isDisabled('#forget-dev');
  report.afterForget = await state(page);
  report.newKey = await signIn(page);

  // The words for every application error, as the page would show them.
  report.described = await page.evaluate(() => Object.fromEntries(
    [-32001, -32002, -32003, -32004, -32005, -32006, -32007, -32603, -32602].map((code) => [code,
      window.circlesPlayground.describeError(code, 'technical message', code === -32007 ? { size: 2000000, limit: 1048576 } : 'worker says')])));

  await page.fill('#url', process.env.UNKNOWN_CIRCLE_URL);
  report.unknownCircle = await play(page, process.env.SCRIPT, 'error');
  report.afterUnknownCircle = await state(page);  // that connection never opened: signed out, Play waits
  await page.fill('#url', 'not a url');
  report.badUrl = await signIn(page);
});
