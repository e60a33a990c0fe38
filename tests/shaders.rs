//! Every shader, in every variant the engine composes, parses and validates with naga. Needs
//! no GPU. A failure names the file and line in `shaders/`.

use naga::valid::{Capabilities, ValidationFlags, Validator};
use sparsync::engine::gpu::shaders::{self, ShaderFile};

/// All subsets of a file's defines.
fn variants(file: &ShaderFile) -> Vec<Vec<&'static str>> {
    let defs = shaders::defines_of(file);
    (0..1u32 << defs.len())
        .map(|mask| defs.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, d)| *d).collect())
        .collect()
}

fn check(file: &ShaderFile, defines: &[&str]) -> Result<(), String> {
    let composed = shaders::compose(file, defines);
    let module = naga::front::wgsl::parse_str(&composed.source).map_err(|e| {
        let span = e.labels().map(|(span, _)| span).find(|s| s.is_defined());
        let at = span.map(|s| composed.locate(s.location(&composed.source).line_number as usize));
        match at {
            Some((f, l)) => format!("shaders/{f}:{l}: {}", e.message()),
            None => format!("shaders/{}: {}", file.name, e.message()),
        }
    })?;
    // What every WebGPU device offers (wgpu grants it from its downlevel flags).
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if defines.contains(&"F16") {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    if defines.contains(&"FLOAT_ATOMIC") {
        caps |= Capabilities::SHADER_FLOAT32_ATOMIC;
    }
    Validator::new(ValidationFlags::all(), caps).validate(&module).map_err(|e| {
        let span = e.spans().map(|(span, _)| *span).find(|s| s.is_defined());
        let at = span.map(|s| composed.locate(s.location(&composed.source).line_number as usize));
        let msg = e.emit_to_string(&composed.source);
        match at {
            Some((f, l)) => format!("shaders/{f}:{l}: {msg}"),
            None => format!("shaders/{}: {msg}", file.name),
        }
    })?;
    Ok(())
}

#[test]
fn every_shader_variant_validates() {
    let mut errors = Vec::new();
    let mut checked = 0;
    for file in shaders::KERNELS {
        for defines in variants(&file) {
            checked += 1;
            if let Err(e) = check(&file, &defines) {
                errors.push(format!("[{} {:?}] {e}", file.name, defines));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n\n"));
    assert_eq!(checked, 8, "aggregate, apply, topk, copy: 1 variant each; aggregate_fast: 4");
}

#[test]
fn every_shader_starts_with_a_header_naming_itself_and_its_bindings() {
    for file in shaders::KERNELS.iter().chain([&shaders::COMMON]) {
        let first = file.source.lines().next().unwrap_or("");
        assert!(first.starts_with(&format!("// {} — ", file.name)), "{}: first line is {first:?}", file.name);
        let has_bindings = file.source.contains("@binding(");
        assert!(
            !has_bindings || file.source.contains("// Bindings"),
            "{} declares bindings but its header does not list them",
            file.name
        );
    }
}

#[test]
fn a_broken_shader_is_reported_with_file_and_line() {
    let bad = ShaderFile {
        name: "broken.wgsl",
        source: "// broken.wgsl — test\nfn f() -> u32 {\n  return 1.5;\n}\n",
    };
    let err = check(&bad, &[]).unwrap_err();
    assert!(err.starts_with("shaders/broken.wgsl:3: "), "{err}");
}
