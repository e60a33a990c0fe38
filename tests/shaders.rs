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
    assert_eq!(checked, 11, "delta, topk, copy: 1 variant each; aggregate: 8 (FAST, F16, BIG_BLOCK)");
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

/// Every composed variant, parsed and validated.
fn modules() -> Vec<(String, Vec<&'static str>, naga::Module, naga::valid::ModuleInfo)> {
    let mut out = Vec::new();
    for file in shaders::KERNELS {
        for defines in variants(&file) {
            let composed = shaders::compose(&file, &defines);
            let module = naga::front::wgsl::parse_str(&composed.source).expect("parses (checked above)");
            let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            if defines.contains(&"F16") {
                caps |= Capabilities::SHADER_FLOAT16;
            }
            let info = Validator::new(ValidationFlags::all(), caps).validate(&module).expect("validates");
            out.push((file.name.to_string(), defines, module, info));
        }
    }
    out
}

/// What every backend wgpu uses makes of each variant: SPIR-V (Vulkan), MSL (Metal), HLSL
/// (DX12; shader model 6.2 where f16 is used, else 5.1 as FXC compiles) and GLSL ES 3.1 (GL;
/// no f16 there, so the F16 variants are not used on it).
#[test]
fn every_variant_translates_for_every_backend() {
    let mut errors = Vec::new();
    for (name, defines, module, info) in modules() {
        let what = format!("{name} {defines:?}");
        if let Err(e) = naga::back::spv::write_vec(&module, &info, &Default::default(), None) {
            errors.push(format!("{what} SPIR-V: {e}"));
        }
        let msl = naga::back::msl::Options { fake_missing_bindings: true, ..Default::default() };
        if let Err(e) = naga::back::msl::write_string(&module, &info, &msl, &Default::default()) {
            errors.push(format!("{what} MSL: {e}"));
        }
        let hlsl = naga::back::hlsl::Options {
            shader_model: if defines.contains(&"F16") {
                naga::back::hlsl::ShaderModel::V6_2
            } else {
                naga::back::hlsl::ShaderModel::V5_1
            },
            ..Default::default()
        };
        let mut out = String::new();
        if let Err(e) =
            naga::back::hlsl::Writer::new(&mut out, &hlsl, &Default::default()).write(&module, &info, None)
        {
            errors.push(format!("{what} HLSL: {e}"));
        }
        if defines.contains(&"F16") {
            continue;
        }
        for ep in &module.entry_points {
            let options = naga::back::glsl::Options {
                version: naga::back::glsl::Version::Embedded { version: 310, is_webgl: false },
                ..Default::default()
            };
            let pipeline = naga::back::glsl::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: ep.name.clone(),
                multiview: None,
            };
            let mut out = String::new();
            let written = naga::back::glsl::Writer::new(
                &mut out,
                &module,
                &info,
                &options,
                &pipeline,
                naga::proc::BoundsCheckPolicies::default(),
            )
            .and_then(|mut w| w.write().map(|_| ()));
            if let Err(e) = written {
                errors.push(format!("{what} GLSL {}: {e}", ep.name));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Whether a block (or a function it calls) has a barrier, and whether a `return` comes before
/// one. FXC (DX12's default compiler) rejects a barrier that an earlier `return` can skip:
/// every kernel runs the same control flow in every invocation and guards the memory work
/// instead.
fn return_before_barrier(module: &naga::Module, block: &naga::Block, returned: &mut bool) -> bool {
    use naga::Statement as S;
    let mut bad = false;
    for s in block.iter() {
        let barrier = match s {
            S::ControlBarrier(_) | S::MemoryBarrier(_) | S::WorkGroupUniformLoad { .. } => true,
            S::Call { function, .. } => {
                let mut inner = false;
                let f = &module.functions[*function];
                let has = has_barrier(module, &f.body);
                bad |= return_before_barrier(module, &f.body, &mut inner) && has;
                has
            }
            _ => false,
        };
        if barrier && *returned {
            bad = true;
        }
        match s {
            S::Return { .. } => *returned = true,
            S::Block(b) => bad |= return_before_barrier(module, b, returned),
            S::If { accept, reject, .. } => {
                bad |= return_before_barrier(module, accept, returned);
                bad |= return_before_barrier(module, reject, returned);
            }
            S::Loop { body, continuing, .. } => {
                bad |= return_before_barrier(module, body, returned);
                bad |= return_before_barrier(module, continuing, returned);
            }
            S::Switch { cases, .. } => {
                for c in cases {
                    bad |= return_before_barrier(module, &c.body, returned);
                }
            }
            _ => {}
        }
    }
    bad
}

fn has_barrier(module: &naga::Module, block: &naga::Block) -> bool {
    use naga::Statement as S;
    block.iter().any(|s| match s {
        S::ControlBarrier(_) | S::MemoryBarrier(_) | S::WorkGroupUniformLoad { .. } => true,
        S::Call { function, .. } => has_barrier(module, &module.functions[*function].body),
        S::Block(b) => has_barrier(module, b),
        S::If { accept, reject, .. } => has_barrier(module, accept) || has_barrier(module, reject),
        S::Loop { body, continuing, .. } => has_barrier(module, body) || has_barrier(module, continuing),
        S::Switch { cases, .. } => cases.iter().any(|c| has_barrier(module, &c.body)),
        _ => false,
    })
}

#[test]
fn no_kernel_returns_before_a_barrier() {
    let mut bad = Vec::new();
    for (name, defines, module, _) in modules() {
        for ep in &module.entry_points {
            let mut returned = false;
            if return_before_barrier(&module, &ep.function.body, &mut returned) {
                bad.push(format!("{name} {defines:?} {}", ep.name));
            }
        }
    }
    assert!(bad.is_empty(), "a return comes before a barrier in: {}", bad.join(", "));
    // The check does see one.
    let src = "@compute @workgroup_size(64) fn main(@builtin(local_invocation_index) i: u32) {\n\
               if (i > 3u) { return; }\n workgroupBarrier();\n}\n";
    let module = naga::front::wgsl::parse_str(src).unwrap();
    let mut returned = false;
    assert!(return_before_barrier(&module, &module.entry_points[0].function.body, &mut returned));
}
