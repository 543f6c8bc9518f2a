// Headless Chromium (Debian's, through playwright-core) with a fresh profile each run, for the
// playground drivers: withPage(fn) runs fn(page, report) and prints the report as JSON on stdout.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export async function withPage(fn) {
  const profile = mkdtempSync(join(tmpdir(), 'circles-chromium-'));
  const report = { console: [] };
  // Playwright passes the profile directory as --user-data-dir.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1000, height: 1100 },
    timeout: 120000,
  });
  try {
    const page = context.pages()[0] || await context.newPage();
    page.setDefaultTimeout(60000);
    page.on('console', (m) => report.console.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => report.console.push(`pageerror: ${e.message}`));
    await fn(page, report);
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(report) + '\n');
}
