// End-to-end test in a real window: the built app under tauri-driver + WebKitWebDriver (Xvfb).
// Imports a LoRA, generates with miniworld, sees the image in the gallery, exports it, and saves
// screenshots (target/e2e/screenshot.png and one per pane).
import { Builder, By, until } from "selenium-webdriver";
import fs from "node:fs";
import { execFileSync } from "node:child_process";
import pako from "pako";
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

// 8-bit RGB/RGBA/grey PNGs (ours) to {w, h, c, data}: enough to compare pixels.
function readPng(file) {
  const b = fs.readFileSync(file);
  let p = 8, w = 0, h = 0, c = 0;
  const idat = [];
  while (p < b.length) {
    const len = b.readUInt32BE(p), type = b.toString("latin1", p + 4, p + 8), body = b.subarray(p + 8, p + 8 + len);
    if (type === "IHDR") { w = body.readUInt32BE(0); h = body.readUInt32BE(4); c = { 0: 1, 2: 3, 4: 2, 6: 4 }[body[9]]; }
    if (type === "IDAT") idat.push(body);
    p += 12 + len;
  }
  const raw = pako.inflate(Buffer.concat(idat));
  const stride = w * c, out = Buffer.alloc(h * stride);
  for (let y = 0; y < h; y++) {
    const f = raw[y * (stride + 1)], row = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const a = x >= c ? out[y * stride + x - c] : 0, up = y > 0 ? out[(y - 1) * stride + x] : 0, ul = y > 0 && x >= c ? out[(y - 1) * stride + x - c] : 0;
      const pa = Math.abs(up - ul), pb = Math.abs(a - ul), pc = Math.abs(a + up - 2 * ul);
      const pred = [0, a, up, (a + up) >> 1, pa <= pb && pa <= pc ? a : pb <= pc ? up : ul][f];
      out[y * stride + x] = (row[x] + pred) & 255;
    }
  }
  return { w, h, c, data: out };
}

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
  // A textual-inversion embedding goes to its own kind, shown in its own section.
  const importPath = await driver.findElement(byTest("import-path"));
  await importPath.clear();
  await importPath.sendKeys(path.join(repo, "tests/fixtures/sdxl/tiny2/ti/vloxemb.safetensors"));
  await driver.findElement(byTest("import")).click();
  const emb = await driver.wait(until.elementLocated(byTest("embedding-card")), 30000);
  await driver.executeScript("arguments[0].scrollIntoView()", emb);
  check((await emb.getAttribute("textContent")).includes("vloxemb"), "an imported embedding is listed as an embedding");
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
  // 4a. Extras: the picture upscaled 2x by Lanczos (the panel's defaults) into the gallery,
  //     its metadata kept and A1111's postprocessing line added.
  const exDir = path.join(process.env.LORAMIX_HOME, "library", "gallery");
  const beforeEx = fs.readdirSync(exDir).filter((f) => f.endsWith(".png"));
  const box = await items[0].findElement(By.css("input[type=checkbox]"));
  await box.click();
  await driver.findElement(byTest("extras-run")).click();
  const exr = await driver.wait(until.elementLocated(byTest("extras-result")), 60000);
  await driver.wait(async () => (await exr.getText()).length > 0, 120000);
  check((await exr.getText()).includes("Upscaled 1"), `extras: ${await exr.getText()}`);
  const upNames = fs.readdirSync(exDir).filter((f) => f.endsWith(".png") && !beforeEx.includes(f));
  check(upNames.length === 1, `extras wrote one picture into the gallery (${upNames.join(", ")})`);
  const upPng = readPng(path.join(exDir, upNames[0])), origPng = readPng(path.join(exDir, beforeEx[0]));
  check(upPng.w === 2 * origPng.w && upPng.h === 2 * origPng.h, `extras doubled ${origPng.w}x${origPng.h} to ${upPng.w}x${upPng.h}`);
  const upBytes = fs.readFileSync(path.join(exDir, upNames[0]));
  check(upBytes.includes(Buffer.from("Postprocess upscaler: Lanczos")) && upBytes.includes(Buffer.from("Lora hashes")), "the upscaled picture keeps its parameters and gains the postprocessing line");
  await driver.wait(async () => (await driver.findElements(byTest("gallery-item"))).length === 2, 30000);
  await shot("gallery.png");
  await box.click();
  fs.copyFileSync(path.join(outDir, "gallery.png"), path.join(outDir, "screenshot.png"));
  await tab("studio");
  await shot("mix.png");
  // 4b. Inpaint the exported image in the Studio: paint a band across it with the brush, no
  //     mask blur; the masked area changes and every other pixel stays the init image's.
  const init = path.join(exportDir, files[0]);
  // The section sits low in the scrolling form: open it and bring each control into view.
  const reveal = async (el) => {
    await driver.executeScript("arguments[0].scrollIntoView({block: 'center'})", el);
    return el;
  };
  await driver.executeScript("document.querySelector('details.i2i').open = true");
  await (await reveal(await driver.findElement(byTest("init-path")))).sendKeys(init);
  await (await reveal(await driver.findElement(byTest("init-load")))).click();
  const canvas = await reveal(await driver.wait(until.elementLocated(byTest("mask-canvas")), 30000));
  const blur = await reveal(await driver.findElement(By.id("mblur")));
  await blur.clear();
  await blur.sendKeys("0");
  await reveal(canvas);
  await driver.actions().move({ origin: canvas, x: -100, y: 0 }).press().move({ origin: canvas, x: 0, y: 10, duration: 200 }).move({ origin: canvas, x: 100, y: 0, duration: 200 }).release().perform();
  const before = fs.readdirSync(path.join(process.env.LORAMIX_HOME, "library", "gallery")).filter((f) => f.endsWith(".png"));
  await (await reveal(await driver.findElement(byTest("generate")))).click();
  const galleryDir = path.join(process.env.LORAMIX_HOME, "library", "gallery");
  let made = null;
  await driver.wait(async () => {
    made = fs.readdirSync(galleryDir).filter((f) => f.endsWith(".png") && !before.includes(f))[0] ?? null;
    return made !== null;
  }, 180000);
  await driver.sleep(500);
  const masks = fs.readdirSync(path.join(galleryDir, "masks"));
  check(masks.length === 1, `the painted mask was saved (${masks.join(", ")})`);
  const m = readPng(path.join(galleryDir, "masks", masks[0]));
  const a = readPng(init), o = readPng(path.join(galleryDir, made));
  let kept = true, painted = 0, changed = 0;
  for (let i = 0; i < a.w * a.h; i++) {
    // The brush's antialiased rim is grey: A1111's overlay blends there, so only pixels the
    // mask leaves at 0 must be exactly the init image's.
    const v = m.data[i * m.c];
    const same = [0, 1, 2].every((k) => a.data[i * a.c + k] === o.data[i * o.c + k]);
    if (v >= 128) { painted++; if (!same) changed++; } else if (v === 0 && !same) kept = false;
  }
  check(painted > 0 && kept, `unmasked pixels are the init image's (${painted} painted)`);
  check(changed > painted / 4, `the masked area changed (${changed}/${painted})`);
  await shot("inpaint.png");
  // The img2img panel's SD upscale switch (off once a mask is painted: the script is img2img's)
  // and a ControlNet unit's controls, as drawn; the unit goes again before the grid.
  const sdu = await reveal(await driver.findElement(byTest("sd-upscale-on")));
  check(!(await sdu.isEnabled()), "SD upscale cannot be switched on over a painted mask");
  await shot("img2img.png");
  await driver.executeScript("document.querySelector('details.controlnet').open = true");
  await (await reveal(await driver.findElement(byTest("controlnet-add")))).click();
  await reveal(await driver.wait(until.elementLocated(byTest("controlnet-unit-0")), 10000));
  await shot("controlnet.png");
  await (await driver.findElement(By.css('[data-testid="controlnet-unit-0"] legend button'))).click();
  // 4c. An X/Y/Z plot from the Studio: two seeds, the cells and a labelled grid in the gallery.
  await driver.executeScript("document.querySelector('details.grid-plot').open = true");
  const gx = await reveal(await driver.findElement(byTest("grid-x")));
  await gx.clear();
  await gx.sendKeys("seed=1,2");
  await (await reveal(await driver.findElement(byTest("grid-run")))).click();
  let gridDir = null;
  await driver.wait(async () => {
    gridDir = fs.readdirSync(galleryDir).find((f) => f.startsWith("grid-") && fs.existsSync(path.join(galleryDir, f, "grid.png"))) ?? null;
    return gridDir !== null;
  }, 180000);
  const cells = fs.readdirSync(path.join(galleryDir, gridDir)).filter((f) => f.startsWith("xyz-")).sort();
  check(cells.join(",") === "xyz-z00-y00-x00-00.png,xyz-z00-y00-x01-00.png", `the grid's cells were written (${cells.join(", ")})`);
  const gridPng = fs.readFileSync(path.join(galleryDir, gridDir, "grid.png"));
  check(gridPng.includes(Buffer.from("loramix-grid")) && gridPng.includes(Buffer.from("Seed: 1")), "the grid PNG names its axis and carries the first cell's parameters");
  await shot("grid.png");
  // 4d. The API switch: the app serves A1111's API; a txt2img request runs on the app's queue
  // and model; switching it off closes the port and saves the switch off.
  await driver.findElement(byTest("api-open")).click();
  const portInput = await driver.findElement(byTest("api-port"));
  await portInput.clear();
  await portInput.sendKeys("7871");
  await driver.findElement(byTest("api-toggle")).click();
  await driver.wait(async () => (await driver.findElement(byTest("api-open")).getText()).includes(":7871"), 30000);
  const res = await withTimeout(fetch("http://127.0.0.1:7871/sdapi/v1/txt2img", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: "a big red circle on a cream background", steps: 4, width: 64, height: 64, seed: 5 }),
  }), 180000, "api txt2img");
  const body = await res.json();
  check(res.status === 200 && body.images.length === 1 && body.images[0].startsWith("iVBOR"), "the app's API answers txt2img with a PNG");
  check(JSON.parse(body.info).seed === 5, "the API reports the request's seed");
  await driver.findElement(byTest("api-toggle")).click();
  await driver.wait(async () => (await driver.findElement(byTest("api-open")).getText()).includes("off"), 30000);
  await new Promise((r) => setTimeout(r, 500));
  const closed = await fetch("http://127.0.0.1:7871/sdapi/v1/sd-models").then(() => false, () => true);
  check(closed, "switching the API off closes its port");
  const saved = JSON.parse(fs.readFileSync(path.join(process.env.LORAMIX_HOME, "library", "app_settings.json"), "utf8"));
  check(saved.api.enabled === false && saved.api.port === 7871, "the switch is saved");
  await driver.findElement(byTest("api-open")).click();

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
