//! WGSL sources and their composition.
//!
//! WGSL has no `#include`, so a kernel is composed as: optional `enable` lines, then
//! `shaders/common.wgsl`, then the kernel file, with `// #if NAME` / `// #else` / `// #endif`
//! lines selecting variants. Excluded lines become empty lines, so a line of the composed
//! source maps back to exactly one line of one file ([`Composed::locate`]).

/// One `.wgsl` file of `shaders/`.
#[derive(Clone, Copy, Debug)]
pub struct ShaderFile {
    pub name: &'static str,
    pub source: &'static str,
}

macro_rules! shader {
    ($name:literal) => {
        ShaderFile { name: $name, source: include_str!(concat!("../../../shaders/", $name)) }
    };
}

pub const COMMON: ShaderFile = shader!("common.wgsl");
pub const AGGREGATE: ShaderFile = shader!("aggregate.wgsl");
pub const DELTA: ShaderFile = shader!("delta.wgsl");
pub const TOPK: ShaderFile = shader!("topk.wgsl");
pub const COPY: ShaderFile = shader!("copy.wgsl");

/// Every kernel file.
pub const KERNELS: [ShaderFile; 4] = [AGGREGATE, DELTA, TOPK, COPY];

/// Defines a kernel file reacts to (every combination is validated by the naga test).
pub fn defines_of(file: &ShaderFile) -> &'static [&'static str] {
    match file.name {
        "aggregate.wgsl" => &["FAST", "F16", "BIG_BLOCK"],
        _ => &[],
    }
}

/// A composed shader and where its lines came from.
#[derive(Clone, Debug)]
pub struct Composed {
    pub source: String,
    /// (file name, first line in the composed source (1-based), number of lines).
    parts: Vec<(&'static str, usize, usize)>,
}

impl Composed {
    /// Maps a 1-based line of the composed source to (file, 1-based line in that file).
    pub fn locate(&self, line: usize) -> (&'static str, usize) {
        for &(name, first, count) in &self.parts {
            if line >= first && line < first + count {
                return (name, line - first + 1);
            }
        }
        ("<composed>", line)
    }
}

/// Composes `kernel` with `defines` switched on.
pub fn compose(kernel: &ShaderFile, defines: &[&str]) -> Composed {
    let mut source = String::new();
    let mut parts = Vec::new();
    let mut line = 1;
    if defines.contains(&"F16") {
        source.push_str("enable f16;\n");
        parts.push(("<enable>", line, 1));
        line += 1;
    }
    for file in [&COMMON, kernel] {
        let text = preprocess(file.source, defines);
        let count = text.lines().count();
        source.push_str(&text);
        if !text.ends_with('\n') {
            source.push('\n');
        }
        parts.push((file.name, line, count));
        line += count;
    }
    Composed { source, parts }
}

/// Applies `// #if NAME`, `// #else`, `// #endif` (nestable), keeping the line count.
fn preprocess(src: &str, defines: &[&str]) -> String {
    let mut out = String::with_capacity(src.len());
    // Each level: (this branch active, some branch of this level taken).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    for l in src.lines() {
        let t = l.trim();
        let active = stack.iter().all(|&(a, _)| a);
        if let Some(name) = t.strip_prefix("// #if ") {
            let on = defines.contains(&name.trim());
            stack.push((on, on));
        } else if t == "// #else" {
            if let Some(top) = stack.last_mut() {
                top.0 = !top.1;
                top.1 = true;
            }
        } else if t == "// #endif" {
            stack.pop();
        } else if active {
            out.push_str(l);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_keeps_lines() {
        let src = "a\n// #if X\nb\n// #else\nc\n// #endif\nd\n";
        assert_eq!(preprocess(src, &["X"]), "a\n\nb\n\n\n\nd\n");
        assert_eq!(preprocess(src, &[]), "a\n\n\n\nc\n\nd\n");
        let c = compose(&DELTA, &["F16"]);
        let common_lines = COMMON.source.lines().count();
        assert_eq!(c.locate(1), ("<enable>", 1));
        assert_eq!(c.locate(2), ("common.wgsl", 1));
        assert_eq!(c.locate(2 + common_lines), ("delta.wgsl", 1));
    }
}
