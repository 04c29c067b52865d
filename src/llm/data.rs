//! JSONL files of the LLM pane: training examples for the mixer and the hypernetwork, and batches
//! of prompts. Every error names the file and the line.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// One line of a training file: a chat turn (`prompt` + `completion`) or plain `text`.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chat { prompt: String, completion: String },
    Text(String),
}

/// A parsed line with its 1-based line number and the raw object (extra fields such as `task`).
#[derive(Debug, Clone)]
pub struct Line<T> {
    pub line: usize,
    pub value: T,
    pub raw: Value,
}

fn bad(path: &Path, line: usize, message: impl std::fmt::Display) -> Error {
    Error::BadFile { path: path.to_path_buf(), message: format!("line {line}: {message}") }
}

/// Every non-blank line of a JSONL file, parsed as JSON.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| bad(path, i + 1, format!("not valid JSON ({e})")))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

fn string_field(path: &Path, line: usize, v: &Value, key: &str) -> Result<Option<String>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(path, line, format!("field \"{key}\" must be a string, found {other}"))),
    }
}

/// Training examples: objects with `prompt` and `completion` (strings), or `text`.
pub fn read_examples(path: &Path) -> Result<Vec<Line<Example>>> {
    let mut out = vec![];
    for (line, v) in read_jsonl(path)? {
        if !v.is_object() {
            return Err(bad(path, line, "expected an object with \"prompt\" and \"completion\" (or \"text\")"));
        }
        let p = string_field(path, line, &v, "prompt")?;
        let c = string_field(path, line, &v, "completion")?;
        let t = string_field(path, line, &v, "text")?;
        let value = match (p, c, t) {
            (Some(prompt), Some(completion), None) => Example::Chat { prompt, completion },
            (None, None, Some(text)) => Example::Text(text),
            (Some(_), None, _) => return Err(bad(path, line, "\"prompt\" without \"completion\"")),
            (None, Some(_), _) => return Err(bad(path, line, "\"completion\" without \"prompt\"")),
            (Some(_), Some(_), Some(_)) => return Err(bad(path, line, "give either \"prompt\"+\"completion\" or \"text\", not both")),
            (None, None, None) => return Err(bad(path, line, "expected \"prompt\" and \"completion\" (or \"text\")")),
        };
        out.push(Line { line, value, raw: v });
    }
    if out.is_empty() {
        return Err(Error::BadFile { path: path.to_path_buf(), message: "no examples (the file is empty)".into() });
    }
    Ok(out)
}

/// A batch of prompts: each line an object with a `prompt` string, or a JSON string.
pub fn read_prompts(path: &Path) -> Result<Vec<Line<String>>> {
    let mut out = vec![];
    for (line, v) in read_jsonl(path)? {
        let p = match &v {
            Value::String(s) => s.clone(),
            Value::Object(_) => string_field(path, line, &v, "prompt")?
                .ok_or_else(|| bad(path, line, "expected a \"prompt\" field (a string)"))?,
            other => return Err(bad(path, line, format!("expected an object with \"prompt\" or a string, found {other}"))),
        };
        out.push(Line { line, value: p, raw: v });
    }
    if out.is_empty() {
        return Err(Error::BadFile { path: path.to_path_buf(), message: "empty batch: no prompts".into() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.jsonl");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn errors_name_the_line() {
        let (_d, p) = file("{\"prompt\":\"a\",\"completion\":\"b\"}\n\n{\"prompt\": 3}\n");
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(e.contains("x.jsonl") && e.contains("line 3") && e.contains("\"prompt\" must be a string"), "{e}");
        let (_d, p) = file("{\"prompt\":\"a\",\"completion\":\"b\"}\n{oops\n");
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("not valid JSON"), "{e}");
        let (_d, p) = file("\n  \n");
        assert!(read_prompts(&p).unwrap_err().to_string().contains("empty batch"));
        let (_d, p) = file("\"hi\"\n{\"prompt\":\"yo\",\"id\":7}\n");
        let v = read_prompts(&p).unwrap();
        assert_eq!((v[0].value.as_str(), v[1].value.as_str(), v[1].line), ("hi", "yo", 2));
    }
}
