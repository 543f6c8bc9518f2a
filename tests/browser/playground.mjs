// Drives the playground in headless Chromium (Debian's, through playwright-core) with a test
// wallet injected as window.ethereum that signs with ethers. Prints a JSON report on stdout.
// Usage: node playground.mjs PAGE_URL SCREENSHOT_PATH   (env: WALLET_KEY, SCRIPT, BAD_SCRIPT)
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const [pageUrl, screenshot] = process.argv.slice(2);
// The UMD build defines window.ethers; the package's exports map does not name it.
const ethersUmd = fileURLToPath(new URL('../../node_modules/ethers/dist/ethers.umd.min.js', import.meta.url));
const profile = mkdtempSync(join(tmpdir(), 'circles-chromium-'));
const report = { console: [] };

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

// A fresh profile directory each run (Playwright passes it as --user-data-dir).
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1000, height: 900 },
  timeout: 120000,
});
try {
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(60000);
  page.on('console', (m) => report.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => report.console.push(`pageerror: ${e.message}`));
  await page.addInitScript({ path: ethersUmd });
  await page.addInitScript(installWallet, process.env.WALLET_KEY);
  await page.goto(pageUrl);
  await page.waitForSelector('body[data-ready="true"]');
  report.url = await page.inputValue('#url');

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
  report.walletCalls = await page.evaluate(() => window.__walletCalls);
  report.keyInPage = await page.evaluate((key) => document.documentElement.outerHTML.includes(key.slice(2)), process.env.WALLET_KEY);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(report) + '\n');
