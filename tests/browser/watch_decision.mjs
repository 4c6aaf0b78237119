// Opens a session's live page in headless Chromium, says "watching" once the event
// stream is connected, then waits (without reloading) for the decision to appear in
// the timeline and in the proposals panel, and saves a screenshot.
// Usage: node watch_decision.mjs <session page url> <screenshot.png> <user data dir>
import { chromium } from "playwright-core";

const [url, screenshot, userDataDir] = process.argv.slice(2);
const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: FLAGS,
  viewport: { width: 1400, height: 1000 },
});
try {
  const page = context.pages()[0] || (await context.newPage());
  const consoleLines = [];
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => consoleLines.push(`failed: ${r.url()}`));
  process.on("exit", (code) => {
    if (code !== 0) console.error(consoleLines.join("\n"));
  });
  page.setDefaultTimeout(60_000);
  await page.goto(url);
  await page.waitForFunction(() =>
    document.getElementById("timeline-status").textContent.startsWith("Live"));
  await page.evaluate(() => { window.__sameDocument = true; });
  const landmarks = await page.evaluate(() => ({
    main: document.querySelectorAll("main").length,
    h1: document.querySelector("h1").textContent,
    nav: document.querySelectorAll("nav[aria-label]").length,
    live: document.getElementById("timeline").getAttribute("aria-live"),
  }));
  console.log("watching");

  const decision = page.locator('#timeline li[data-type="decision"]');
  await decision.waitFor();
  const panel = page.locator("#proposals .decision strong");
  try {
    await panel.filter({ hasText: "Decision: rollback" }).waitFor();
  } catch (error) {
    await page.screenshot({ path: screenshot, fullPage: true });
    console.error(await page.locator(".panels").innerHTML());
    throw error;
  }
  const sameDocument = await page.evaluate(() => window.__sameDocument === true);
  const steps = await page.locator("#timeline li").count();
  const traceLinks = await page.locator("#timeline li a.trace").count();
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({
    decision: (await decision.textContent()).trim(),
    panel: (await panel.first().textContent()).trim(),
    sameDocument, steps, traceLinks, landmarks,
  }));
} finally {
  await context.close();
}
