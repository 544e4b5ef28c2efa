//! A small YAML writer for JSON-shaped values.
//!
//! The NodeConfig is a tree of maps, lists and strings, so a full YAML library is not needed to
//! write it. Strings are written as JSON strings: every JSON string is a valid YAML
//! double-quoted scalar with the same value, so no value can change type (`"yes"`, `"1.31"`,
//! `"0123"`) or break the document (`: `, `#`, newlines).

use std::fmt::Write as _;

use serde_json::Value;

/// Writes `value` (an object) as a block-style YAML document.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(map, 0, &mut out),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn write_map(map: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    for (key, value) in map {
        let _ = write!(out, "{:indent$}{}:", "", key_text(key));
        write_child(value, indent, out);
    }
}

fn write_list(items: &[Value], indent: usize, out: &mut String) {
    for item in items {
        let _ = write!(out, "{:indent$}-", "");
        write_child(item, indent, out);
    }
}

/// Writes what follows `key:` or `-`: a scalar on the same line, or a nested block below.
fn write_child(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_map(map, indent + 2, out);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_list(items, indent + 2, out);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        // JSON's rendering of strings, numbers, booleans and null is valid YAML with the same meaning.
        other => other.to_string(),
    }
}

fn key_text(key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain { key.to_owned() } else { Value::String(key.to_owned()).to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_nested_maps_and_lists() {
        let doc = json!({"a": {"b": "x", "c": ["--f=1", "--g"]}, "d": true, "e": {}, "f": []});
        assert_eq!(to_yaml(&doc), "a:\n  b: \"x\"\n  c:\n    - \"--f=1\"\n    - \"--g\"\nd: true\ne: {}\nf: []\n");
    }

    #[test]
    fn tricky_strings_survive_a_real_yaml_parser() {
        let tricky = ["yes", "1.31", "0123", "a: b", "# not a comment", "line\nbreak", "quote\"s", "tab\t", "ünï", ""];
        let doc = json!({"items": tricky, "key with space": "v"});
        let text = to_yaml(&doc);
        let parsed = yaml_rust2::YamlLoader::load_from_str(&text).expect("valid yaml");
        let items = parsed[0]["items"].as_vec().expect("list");
        let back: Vec<&str> = items.iter().map(|y| y.as_str().expect("string")).collect();
        assert_eq!(back, tricky);
        assert_eq!(parsed[0]["key with space"].as_str(), Some("v"));
    }
}
