// End-to-end test in a real window: the built app under tauri-driver + WebKitWebDriver (Xvfb).
// Imports a LoRA, generates with miniworld, sees the image in the gallery, exports it, and saves
// screenshots (target/e2e/screenshot.png and one per pane).
import { Builder, By, until } from "selenium-webdriver";
import fs from "node:fs";
import { execFileSync } from "node:child_process";
import path from "node:path";

const repo = path.resolve(process.env.REPO);
const app = process.env.APP;
const outDir = path.join(repo, "target/e2e");
const exportDir = path.join(process.env.LORAMIX_HOME, "exported");
fs.mkdirSync(outDir, { recursive: true });

const driver = await new Builder()
  .usingServer("http://127.0.0.1:4444/")
  .withCapabilities({ "tauri:options": { application: app }, browserName: "wry" })
  .build();

const t0 = Date.now();
const log = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
// A command that never answers must fail the test, not hang CI.
function withTimeout(promise, ms, what) {
  let timer;
  const t = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms / 1000}s`)), ms)));
  return Promise.race([promise, t]).finally(() => clearTimeout(timer));
}
// Screenshots come from the X server (ImageMagick's `import` on Xvfb's root window), i.e. the real
// window as drawn: WebKitWebDriver's own snapshot sometimes never returns under Xvfb.
async function shot(name) {
  log(`screenshot ${name}`);
  await new Promise((r) => setTimeout(r, 400)); // let the pane paint
  execFileSync("import", ["-window", "root", path.join(outDir, name)], { timeout: 30000 });
}
const byTest = (id) => By.css(`[data-testid="${id}"]`);
async function tab(id) {
  log(`tab ${id}`);
  await driver.findElement(By.css(`[data-tab="${id}"]`)).click();
}
function check(cond, msg) {
  if (!cond) throw new Error(msg);
  console.log("ok -", msg);
}

let failed = false;
try {
  await driver.wait(until.elementLocated(By.css("[data-tab=library]")), 30000);
  // 1. Import a LoRA fixture through the library pane.
  await tab("library");
  const lora = path.join(repo, "models/miniworld/loras/striped.safetensors");
  await driver.findElement(byTest("import-path")).sendKeys(lora);
  await driver.findElement(byTest("import")).click();
  await driver.wait(until.elementLocated(byTest("lora-card")), 30000);
  const progress = await driver.wait(until.elementLocated(byTest("import-progress")), 10000);
  check((await progress.getText()).includes("added"), "the import is reported per file");
  await driver.findElement(By.xpath("//button[contains(., '+ Mix')]")).click();
  await shot("library.png");

  // 2. Generate with miniworld and the LoRA.
  await tab("studio");
  const prompt = await driver.findElement(By.id("prompt"));
  await prompt.sendKeys("a big red circle on a cream background, striped style");
  const steps = await driver.findElement(By.id("steps"));
  await steps.clear();
  await steps.sendKeys("12");
  await driver.findElement(byTest("generate")).click();
  await driver.wait(until.elementLocated(By.css(".preview img")), 120000);
  await shot("studio.png");

  // 3. The image appears in the gallery.
  await tab("gallery");
  await driver.wait(until.elementLocated(By.css("[data-testid=gallery-item] img")), 180000);
  const items = await driver.findElements(byTest("gallery-item"));
  check(items.length === 1, "one image in the gallery");
  await items[0].findElement(By.css("button")).click();

  // 4. Export it.
  await driver.findElement(byTest("export-dest")).sendKeys(exportDir);
  await driver.findElement(byTest("export-all")).click();
  const result = await driver.wait(until.elementLocated(byTest("export-result")), 30000);
  await driver.wait(async () => (await result.getText()).includes("Exported"), 30000);
  const files = fs.readdirSync(exportDir).filter((f) => f.endsWith(".png"));
  check(files.length === 1, `exported ${files.join(", ")}`);
  const png = fs.readFileSync(path.join(exportDir, files[0]));
  check(png.includes(Buffer.from("Lora hashes")) && png.includes(Buffer.from("loramix")), "the export carries parameters and our JSON chunk");
  await shot("gallery.png");
  fs.copyFileSync(path.join(outDir, "gallery.png"), path.join(outDir, "screenshot.png"));
  await tab("studio");
  await shot("mix.png");
  // 5. The LLM pane on the model we ship: an aLoRA reply on the cached conversation, then a
  //    batch of prompts answered per cluster into a JSONL file.
  await tab("chat");
  await driver.findElement(byTest("llm-load")).click();
  await driver.wait(until.elementLocated(byTest("llm-loaded")), 60000);
  await driver.findElement(byTest("llm-adapter")).sendKeys(path.join(repo, "models/minichat/aloras/negative"));
  await driver.findElement(byTest("llm-add")).click();
  await driver.wait(until.elementLocated(byTest("invoke-negative")), 30000);
  await driver.findElement(byTest("chat-input")).sendKeys("negative prompt for: a krin emblem on a pink background, painted style");
  await driver.findElement(byTest("invoke-negative")).click();
  await driver.wait(until.elementLocated(byTest("turn-stats")), 60000);
  const texts = await driver.findElements(byTest("turn-text"));
  const reply = await texts[texts.length - 1].getText();
  check(reply.includes("striped style") && !reply.includes("painted style"), `the negative aLoRA answers: ${reply}`);
  const stats = await driver.findElement(byTest("turn-stats")).getText();
  check(/reused [1-9]/.test(stats), `the invocation reuses the conversation cache (${stats})`);
  const answers = path.join(exportDir, "answers.jsonl");
  await driver.findElement(byTest("batch-file")).sendKeys(path.join(repo, "models/minichat/data/batch_prompts.jsonl"));
  await driver.findElement(byTest("batch-out")).sendKeys(answers);
  await driver.findElement(byTest("batch-run")).click();
  const bp = await driver.wait(until.elementLocated(byTest("batch-progress")), 30000);
  await driver.wait(async () => (await bp.getText()).includes("answers in"), 120000);
  const lines = fs.readFileSync(answers, "utf8").trim().split("\n").map((l) => JSON.parse(l));
  check(lines.length === 24 && lines.every((l, i) => l.index === i && typeof l.answer === "string"), "the batch writes one answer per prompt, in order");
  await shot("llm.png");
} catch (e) {
  failed = true;
  console.error("e2e failed:", e);
  try {
    await shot("failure.png");
  } catch {}
} finally {
  await withTimeout(driver.quit(), 20000, "quit").catch((e) => console.error(String(e)));
}
process.exit(failed ? 1 : 0);
