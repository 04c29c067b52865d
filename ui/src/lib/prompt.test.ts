import { describe, expect, it } from "vitest";
import { applyCompletion, loraCompletionAt, loraTags, rankNames, wordCompletionAt } from "./prompt";

describe("lora autocomplete", () => {
  it("finds the tag being typed", () => {
    const t = "a cat <lora:vl";
    expect(loraCompletionAt(t, t.length)).toEqual({ from: 6, to: t.length, query: "vl" });
  });
  it("stops once the name is done or the tag closed", () => {
    expect(loraCompletionAt("<lora:vlox:0.", 13)).toBeNull();
    expect(loraCompletionAt("<lora:vlox:1> and", 17)).toBeNull();
    expect(loraCompletionAt("no tag here", 5)).toBeNull();
  });
  it("ranks prefix matches before substring matches", () => {
    expect(rankNames(["striped", "vlox", "tebo", "dotted", "vlox_v2"], "t")).toEqual(["tebo", "dotted", "striped"]);
    expect(rankNames(["a", "b"], "", 1)).toEqual(["a"]);
  });
  it("replaces a half-typed tag and places the caret after it", () => {
    const t = "x <lora:vl rest";
    const c = loraCompletionAt(t, 10)!;
    expect(applyCompletion(t, c, "vlox", 0.8)).toEqual({ text: "x <lora:vlox:0.8> rest", caret: 17 });
    const t2 = "x <lora:vl:0.5> y";
    expect(applyCompletion(t2, { from: 2, to: 10, query: "vl" }, "vlox").text).toBe("x <lora:vlox:1> y");
  });
  it("parses tags with and without weights", () => {
    expect(loraTags("a <lora:vlox:0.7> b <lora:striped> <lora:x:-1>")).toEqual([
      { name: "vlox", weight: 0.7 },
      { name: "striped", weight: 1 },
      { name: "x", weight: -1 },
    ]);
  });
});

describe("embedding autocomplete", () => {
  it("completes the word being typed, outside tags", () => {
    const t = "a photo, unaesth";
    expect(wordCompletionAt(t, t.length)).toEqual({ from: 9, to: t.length, query: "unaesth", kind: "embedding" });
    expect(wordCompletionAt("a <lora:vl", 10)).toBeNull();
    expect(wordCompletionAt("a b", 3)).toBeNull();
  });
  it("replaces the word with the name, keeping the rest", () => {
    const t = "x unae, y";
    const c = wordCompletionAt(t, 6)!;
    expect(applyCompletion(t, c, "unaestheticXL")).toEqual({ text: "x unaestheticXL, y", caret: 15 });
  });
});
