// Drives the playground in headless Chromium (Debian's, through playwright-core) with a test
// wallet injected as window.ethereum that signs with ethers. Prints a JSON report on stdout.
// Usage: node playground.mjs PAGE_URL SCREENSHOT_PATH   (env: WALLET_KEY, SCRIPT, BAD_SCRIPT)
import { fileURLToPath } from 'node:url';
import { withPage } from './chromium.mjs';

const [pageUrl, screenshot] = process.argv.slice(2);
// The UMD build defines window.ethers; the package's exports map does not name it.
const ethersUmd = fileURLToPath(new URL('../../node_modules/ethers/dist/ethers.umd.min.js', import.meta.url));

// An EIP-1193 provider over an ethers Wallet: what MetaMask offers a page, minus the prompts.
function installWallet(privateKey) {
  const wallet = new window.ethers.Wallet(privateKey);
  window.__walletCalls = [];
  window.ethereum = {
    isTestWallet: true,
    async request({ method, params }) {
      window.__walletCalls.push(method);
      if (method === 'eth_requestAccounts' || method === 'eth_accounts') return [wallet.address];
      if (method === 'personal_sign') {
        const [message, account] = params;
        if (account.toLowerCase() !== wallet.address.toLowerCase()) throw new Error('unknown account');
        const bytes = window.ethers.isHexString(message) ? window.ethers.getBytes(message) : message;
        return wallet.signMessage(bytes);
      }
      throw Object.assign(new Error(`unsupported method ${method}`), { code: 4200 });
    },
  };
}

await withPage(async (page, report) => {
  await page.addInitScript({ path: ethersUmd });
  await page.addInitScript(installWallet, process.env.WALLET_KEY);
  await page.goto(pageUrl);
  await page.waitForSelector('body[data-ready="true"]');
  report.url = await page.inputValue('#url');
  // With a wallet, it is the default: its button shows, the development key's is secondary.
  report.walletDefault = await page.isVisible('#signin') && !await page.isVisible('#no-wallet')
    && await page.evaluate(() => document.querySelector('#signin-dev').classList.contains('secondary'));

  await page.click('#signin');
  await page.waitForFunction(() => document.querySelector('#identity').dataset.pubkey);
  report.pubkey = await page.getAttribute('#identity', 'data-pubkey');
  report.identity = await page.textContent('#identity');

  await page.fill('#script', process.env.SCRIPT);
  await page.click('#run');
  await page.waitForSelector('#output[data-state="done"]');
  report.output = await page.textContent('#output');
  await page.screenshot({ path: screenshot, fullPage: true });

  await page.fill('#script', process.env.BAD_SCRIPT);
  await page.click('#run');
  await page.waitForSelector('#output[data-state="error"]');
  report.error = await page.textContent('#error');
  report.errorMessage = await page.textContent('#error-message');
  report.status = await page.textContent('#status');
  report.walletCalls = await page.evaluate(() => window.__walletCalls);
  report.keyInPage = await page.evaluate((key) => document.documentElement.outerHTML.includes(key.slice(2)), process.env.WALLET_KEY);
});
