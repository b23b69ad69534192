//! One typed launcher per `.cu` kernel. Each declaration names the kernel (a `format!` pattern
//! for the macro-instantiated families, e.g. `"gemvq_{}_{}r{}w{}"` for
//! `gemvq_##NAME##_##NB##r##R##w##TW`) and lists its parameters as the kernel's signature does:
//! same names, same order, pointers as
//! `*const T` / `*mut T` of the pointee (passed as `u64` device addresses), `int` as `i32`,
//! `unsigned` as `u32`, `float` as `f32`, structs as their `#[repr(C)]` mirrors. The test below
//! parses every `extern "C" __global__` signature of the sources and compares it with these
//! declarations; the compiler then holds every call to its launcher's parameter types.

use super::launch::KArg;
use super::rope::RopeKArg;
use super::CudaKernels;
use crate::cuda::error::CudaResult;
use cudarc::driver::CudaStream;

/// A kernel parameter type as declared, and the host value passed for it.
pub(super) trait KParam {
    /// What the launcher takes: the device address for pointers, the value itself otherwise.
    type Host: KArg;
}
impl<T> KParam for *const T {
    type Host = u64;
}
impl<T> KParam for *mut T {
    type Host = u64;
}
macro_rules! by_value {
    ($($t:ty),*) => {$(impl KParam for $t { type Host = $t; })*};
}
by_value!(i32, u32, i64, f32, RopeKArg);

/// The typed launchers of a [`CudaKernels`] ([`CudaKernels::k`]).
#[derive(Clone, Copy)]
pub(super) struct Launchers<'a>(&'a CudaKernels);

impl CudaKernels {
    /// The typed launchers.
    pub(super) fn k(&self) -> Launchers<'_> {
        Launchers(self)
    }
}

/// A launcher's declaration, as the signature test reads it.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
struct Declared {
    launcher: &'static str,
    /// Kernel name, or `format!` pattern of a family's names.
    kernel: &'static str,
    /// (name, Rust type) of each parameter.
    params: &'static [(&'static str, &'static str)],
}

/// Declares the launchers: `launcher["kernel"] => via(params);`, or for a family
/// `launcher["pattern"](parts) => via(params);`, makes a method of [`Launchers`] taking the name
/// parts (formatted into the pattern), the grid, threads per block, dynamic shared memory bytes
/// and stream, then the kernel's parameters, launched with `CudaKernels::via` (`launch`, or
/// `launch_gemvq` for programmatic dependents).
macro_rules! launchers {
    (@name $kernel:literal) => { $kernel };
    (@name $kernel:literal $($v:ident),+) => { &format!($kernel, $($v),+) };
    ($(
        $(#[$doc:meta])*
        $f:ident[$kernel:literal] $(($($v:ident: $vt:ty),+))? => $via:ident
            ($($p:ident: $t:ty),* $(,)?);
    )*) => {
        impl Launchers<'_> {
            $(
                $(#[$doc])*
                pub(super) fn $f(
                    self,
                    $($($v: $vt,)+)?
                    grid: (u32, u32, u32),
                    block: u32,
                    smem: u32,
                    stream: &CudaStream,
                    $($p: <$t as KParam>::Host),*
                ) -> CudaResult<()> {
                    self.0.$via(
                        launchers!(@name $kernel $($($v),+)?),
                        grid,
                        block,
                        smem,
                        stream,
                        &[$(&$p),*],
                    )
                }
            )*
        }

        /// Every launcher's declaration.
        #[cfg(test)]
        const DECLARED: &[Declared] = &[$(Declared {
            launcher: stringify!($f),
            kernel: $kernel,
            params: &[$((stringify!($p), stringify!($t))),*],
        }),*];
    };
}

launchers! {
    // matmul.cu

    /// `dequant_<type>`: GGUF blocks to f16, one thread per 8-value unit.
    dequant["dequant_{}"](ty: &str) => launch
        (src: *const u8, dst: *mut u16, n_units: i64);
    /// `gemv_<type>_<nb>r<r>`: f32-activation GEMV of float weights, `nb` batch rows, `r` rows per
    /// warp.
    gemv["gemv_{}_{}r{}"](ty: &str, batch: usize, rows_per_warp: usize) => launch
        (w: *const u8, row_bytes: i64, rows: i32, cols: i32, x: *const f32, ldx: i32,
         y: *mut f32, ldy: i32, bias: *const f32);
    /// `gemv_<type>_1k`: single-row GEMV with a whole block per weight row.
    gemv_1k["gemv_{}_1k"](ty: &str) => launch
        (w: *const u8, row_bytes: i64, rows: i32, cols: i32, x: *const f32, y: *mut f32,
         bias: *const f32);
    /// `get_rows_<type>`: embedding lookup.
    get_rows["get_rows_{}"](ty: &str) => launch
        (table: *const u8, row_bytes: i64, cols: i32, ids: *const i32, out: *mut f32, ldo: i32,
         scale: f32);
    /// `moe_gemv_<type>`: expert GEMV of float experts.
    moe_gemv["moe_gemv_{}"](ty: &str) => launch
        (w: *const u8, expert_bytes: i64, row_bytes: i64, rows: i32, cols: i32, x: *const f32,
         ldx: i32, x_div: i32, route: *const u32, n_used: i32, y: *mut f32, ldy: i32);

    // gemv.cu

    /// Activations to Q8_0 blocks.
    quantize_q8_0["quantize_q8_0"] => launch
        (x: *const f32, ldx: i32, cols: i32, q: *mut i8, d: *mut f32);
    /// Activations to Q8_1 blocks (scale, scaled sum).
    quantize_q8_1["quantize_q8_1"] => launch
        (x: *const f32, ldx: i32, cols: i32, q: *mut i8, d: *mut f32);
    /// Activations to Q8_K blocks with their 16-element sums.
    quantize_q8_k["quantize_q8_k"] => launch
        (x: *const f32, ldx: i32, cols: i32, q: *mut i8, d: *mut f32, bs: *mut i16);
    /// `gemvq_<type>_<nb>r<r>w<tw>`: int8 GEMV, a programmatic dependent of its quantizer.
    gemvq["gemvq_{}_{}r{}w{}"](ty: &str, max_nb: usize, r: usize, tw: usize) => launch_gemvq
        (w: *const u8, row_bytes: i64, rows: i32, cols: i32, nb: i32, q: *const i8,
         d: *const f32, bs: *const i16, y: *mut f32, ldy: i32, bias: *const f32);
    /// `moe_gemvq_<type>_r<r>w<tw>`: int8 expert GEMV, a programmatic dependent of its quantizer.
    moe_gemvq["moe_gemvq_{}_r{}w{}"](ty: &str, r: usize, tw: usize) => launch_gemvq
        (w: *const u8, expert_bytes: i64, row_bytes: i64, rows: i32, cols: i32, q: *const i8,
         d: *const f32, bs: *const i16, p0: i32, x_div: i32, route: *const u32, n_used: i32,
         y: *mut f32, ldy: i32);

    // mmq.cu

    /// `mmq_<type>_<bm>x<bn>`: int8 tensor-core matmul, a programmatic dependent of its
    /// quantizer.
    mmq["mmq_{}_{}x{}"](ty: &str, bm: usize, bn: usize) => launch_gemvq
        (w: *const u8, row_bytes: i64, rows: i32, cols: i32, n: i32, q: *const i8,
         d: *const f32, bs: *const i16, y: *mut f32, ldy: i32, bias: *const f32);

    // ops.cu

    /// RMS norm of each row.
    rms_norm["rms_norm"] => launch
        (x: *const f32, w: *const f32, y: *mut f32, cols: i32, eps: f32);
    /// RMS norm of each head, in place.
    head_rms_norm["head_rms_norm"] => launch
        (x: *mut f32, w: *const f32, n_heads_total: i32, head_dim: i32, eps: f32);
    /// Rope in place.
    rope["rope"] => launch
        (x: *mut f32, pos: *const i32, n_tokens: i32, n_heads: i32, head_dim: i32, r: RopeKArg);
    /// Rope of heads from one buffer into another.
    rope_heads["rope_heads"] => launch
        (src: *const f32, ld_src: i32, src_stride: i32, src_off: i32, dst: *mut f32,
         ld_dst: i32, dst_stride: i32, dst_off: i32, n_heads: i32, pos: *const i32,
         n_tokens: i32, r: RopeKArg);
    /// Latent attention's K rows: norm of the latent part, rope of the rest.
    mla_kv["mla_kv"] => launch
        (x: *const f32, ldx: i32, w: *const f32, out: *mut f32, ldo: i32, kv_lora: i32,
         eps: f32, pos: *const i32, r: RopeKArg);
    /// Routes of per-head matmuls.
    head_route["head_route"] => launch
        (route: *mut u32, n_tokens: i32, n_heads: i32);
    /// Per-head norm and rope of q and k.
    qk_norm_rope["qk_norm_rope"] => launch
        (q: *mut f32, k: *mut f32, qw: *const f32, kw: *const f32, eps: f32, pos: *const i32,
         n_tokens: i32, n_q: i32, n_k: i32, head_dim: i32, r: RopeKArg);
    /// Context shift of f16 KV rows.
    kv_shift["kv_shift"] => launch
        (rows: *mut u16, cols: i32, moves: *const i32, run_start: *const i32,
         cyclic: *const i32, head_dim: i32, rope_off: i32, delta: f32, r: RopeKArg);
    /// Context shift of Q8_0 KV rows.
    kv_shift_q8_0["kv_shift_q8_0"] => launch
        (rows: *mut u8, cols: i32, moves: *const i32, run_start: *const i32,
         cyclic: *const i32, head_dim: i32, rope_off: i32, delta: f32, r: RopeKArg);
    /// Gated linear unit.
    glu["glu"] => launch
        (gate: *const f32, up: *const f32, out: *mut f32, n: i64, act: i32, alpha: f32,
         limit: f32);
    /// Sum of two vectors.
    add["add"] => launch
        (a: *const f32, b: *const f32, out: *mut f32, n: i64);
    /// Soft-cap in place.
    softcap["softcap"] => launch
        (x: *mut f32, n: i64, cap: f32);
    /// Scale in place.
    scale["scale"] => launch
        (x: *mut f32, n: i64, s: f32);
    /// f32 to f16.
    f32_to_f16["f32_to_f16"] => launch
        (x: *const f32, y: *mut u16, n: i64);
    /// f32 to bf16.
    f32_to_bf16["f32_to_bf16"] => launch
        (x: *const f32, y: *mut u16, n: i64);
    /// KV write into an f16 cache.
    kv_write["kv_write"] => launch
        (src: *const f32, ld_src: i32, cache: *mut u16, row: i32, pos: *const i32,
         seq: *const i32, cells: i32);
    /// KV write into a Q8_0 cache.
    kv_write_q8_0["kv_write_q8_0"] => launch
        (src: *const f32, ld_src: i32, cache: *mut u8, row: i32, pos: *const i32,
         seq: *const i32, cells: i32);
    /// Row gather.
    select_rows["select_rows"] => launch
        (x: *const f32, rows: *const i32, out: *mut f32, cols: i32);
    /// MoE routing.
    moe_route["moe_route"] => launch
        (logits: *const f32, n_tokens: i32, n_expert: i32, n_used: i32, gating: i32,
         sel_bias: *const f32, n_groups: i32, n_groups_used: i32, normalize: i32, scale: f32,
         forced: *const u32, route: *mut u32);
    /// Expert biases of expert FFN rows.
    moe_add_bias["moe_add_bias"] => launch
        (h: *mut f32, ldh: i32, route: *const u32, n_used: i32, order: *const i32, row0: i32,
         bias: *const f32, cols: i32);
    /// Weighted sum of each token's expert rows.
    moe_combine["moe_combine"] => launch
        (h: *const f32, route: *const u32, n_used: i32, out: *mut f32, cols: i32);
    /// Row gather to f16.
    gather_rows_f16["gather_rows_f16"] => launch
        (x: *const f32, ldx: i32, rows: *const i32, x_div: i32, out: *mut u16, cols: i32);
    /// Row scatter.
    scatter_rows["scatter_rows"] => launch
        (x: *const f32, rows: *const i32, y: *mut f32, cols: i32);
    /// Bias of each row, in place.
    add_bias["add_bias"] => launch
        (y: *mut f32, bias: *const f32, cols: i32, ldy: i32, n_total: i64);

    // attention.cu

    /// `flash_attn_<d>`: flash attention over an f16 cache.
    flash_attn["flash_attn_{}"](d: usize) => launch
        (q: *const f32, ldq: i32, kc: *const u16, vc: *const u16, out: *mut f32, ldo: i32,
         pos: *const i32, n_tokens: i32, n_head: i32, n_kv: i32, kv_base: i32, cells: i32,
         scale: f32, softcap: f32, window: i32, sinks: *const f32);
    /// `flash_attn_q8_<d>`: flash attention over a Q8_0 cache.
    flash_attn_q8["flash_attn_q8_{}"](d: usize) => launch
        (q: *const f32, ldq: i32, kc: *const u8, vc: *const u8, out: *mut f32, ldo: i32,
         pos: *const i32, n_tokens: i32, n_head: i32, n_kv: i32, kv_base: i32, cells: i32,
         scale: f32, softcap: f32, window: i32, sinks: *const f32);
    /// Split-KV partials over an f16 cache.
    attn_split["attn_split"] => launch
        (q: *const f32, ldq: i32, kc: *const u16, vc: *const u16, part: *mut f32,
         pos: *const i32, seq: *const i32, n_head: i32, n_kv: i32, cells: i32, dk: i32,
         dv: i32, scale: f32, softcap: f32, window: i32, n_split: i32);
    /// Split-KV partials over a Q8_0 cache.
    attn_split_q8["attn_split_q8"] => launch
        (q: *const f32, ldq: i32, kc: *const u8, vc: *const u8, part: *mut f32,
         pos: *const i32, seq: *const i32, n_head: i32, n_kv: i32, cells: i32, dk: i32,
         dv: i32, scale: f32, softcap: f32, window: i32, n_split: i32);
    /// Merge of the split-KV partials.
    attn_combine["attn_combine"] => launch
        (part: *const f32, out: *mut f32, ldo: i32, pos: *const i32, n_head: i32, dv: i32,
         window: i32, n_split: i32, sinks: *const f32);
    /// Latent-attention partials over an f16 cache.
    mla_attn_split["mla_attn_split"] => launch
        (q: *const f32, ldq: i32, kc: *const u16, ldk: i32, part: *mut f32, pos: *const i32,
         seq: *const i32, n_head: i32, cells: i32, dk: i32, dv: i32, scale: f32, window: i32,
         n_split: i32);
    /// Latent-attention partials over a Q8_0 cache.
    mla_attn_split_q8["mla_attn_split_q8"] => launch
        (q: *const f32, ldq: i32, kc: *const u8, ldk: i32, part: *mut f32, pos: *const i32,
         seq: *const i32, n_head: i32, cells: i32, dk: i32, dv: i32, scale: f32, window: i32,
         n_split: i32);

    // moe_gemm.cu

    /// Sort of (token, slot) pairs by expert.
    moe_sort["moe_sort"] => launch
        (route: *const u32, n_tokens: i32, n_used: i32, n_expert: i32, offsets: *mut i32,
         tiles: *mut i32, order: *mut i32);
    /// `moe_gemm_<type>_<bm>x<bn>`: grouped expert GEMM.
    moe_gemm["moe_gemm_{}_{}x{}"](ty: &str, bm: usize, bn: usize) => launch
        (w: *const u8, expert_bytes: i64, row_bytes: i64, rows: i32, cols: i32, n_expert: i32,
         x: *const u16, offsets: *const i32, tiles: *const i32, y: *mut f32, ldy: i32,
         y_rows: *const i32);
}

#[cfg(test)]
mod tests {
    use super::super::launch::kernel_names;
    use super::*;
    use crate::cuda::nvrtc::SOURCES;

    /// A parameter type, normalised: pointee constness and type, or a value type, in Rust names.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Ty {
        Ptr { constant: bool, elem: String },
        Val(String),
    }

    impl std::fmt::Display for Ty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Ty::Ptr { constant, elem } => {
                    write!(f, "*{} {elem}", if *constant { "const" } else { "mut" })
                }
                Ty::Val(t) => f.write_str(t),
            }
        }
    }

    /// `name: type, ...`.
    fn show(params: &[(&str, Ty)]) -> String {
        let p: Vec<String> = params.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        p.join(", ")
    }

    /// The Rust mirrors of the kernels' by-value structs.
    const STRUCTS: &[(&str, &str)] = &[("RopeP", "RopeKArg")];

    /// A C type or typedef as its Rust counterpart, `None` if there is none.
    fn c_scalar(c: &str) -> Option<&'static str> {
        Some(match c {
            "float" => "f32",
            "int" | "signed" | "signed int" => "i32",
            "unsigned" | "unsigned int" => "u32",
            "long long" => "i64",
            "unsigned long long" => "u64",
            "short" => "i16",
            "unsigned short" => "u16",
            "signed char" => "i8",
            "unsigned char" => "u8",
            "u8" | "i8" | "u16" | "i16" | "u32" | "i32" | "u64" | "i64" => {
                ["u8", "i8", "u16", "i16", "u32", "i32", "u64", "i64"]
                    .into_iter()
                    .find(|&t| t == c)?
            }
            s => STRUCTS.iter().find(|&&(cs, _)| cs == s)?.1,
        })
    }

    /// A C parameter type (`const float* __restrict__`, `int`, `RopeP`), normalised.
    fn c_type(c: &str) -> Result<Ty, String> {
        let c = c.replace("__restrict__", " ");
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let elem_of = |s: &str| {
            c_scalar(s)
                .map(str::to_string)
                .ok_or(format!("C type {s:?}"))
        };
        match c.matches('*').count() {
            0 => Ok(Ty::Val(elem_of(&words(&c))?)),
            1 => {
                let (before, after) = c.split_once('*').expect("one star");
                if !words(after).is_empty() {
                    return Err(format!("qualified pointer {c:?}"));
                }
                let before = words(before);
                let (constant, elem) = match before.strip_prefix("const ") {
                    Some(e) => (true, e.to_string()),
                    None => (false, before),
                };
                Ok(Ty::Ptr {
                    constant,
                    elem: elem_of(&elem)?,
                })
            }
            _ => Err(format!("pointer to pointer {c:?}")),
        }
    }

    /// A declared Rust parameter type (`*const f32`, `i32`, `RopeKArg`), normalised.
    fn rust_type(r: &str) -> Ty {
        let r = r.split_whitespace().collect::<Vec<_>>().join(" ");
        let r = r.replace("* ", "*");
        if let Some(e) = r.strip_prefix("*const ") {
            Ty::Ptr {
                constant: true,
                elem: e.to_string(),
            }
        } else if let Some(e) = r.strip_prefix("*mut ") {
            Ty::Ptr {
                constant: false,
                elem: e.to_string(),
            }
        } else {
            Ty::Val(r)
        }
    }

    /// A kernel signature from the sources: `file`, the name (a family's as the `format!`
    /// pattern its launcher declares: `gemv_##NAME##_1k` is `gemv_{}_1k`) and the parameters.
    #[derive(Debug)]
    struct Signature {
        file: &'static str,
        kernel: String,
        params: Vec<(String, Ty)>,
    }

    /// The text between the parenthesis opening at `s[0]` and its match, and what follows.
    fn parens(s: &str) -> Option<(&str, &str)> {
        let mut depth = 0;
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some((&s[1..i], &s[i + 1..]));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Every `extern "C" __global__ void` signature of a source (macro bodies included).
    fn signatures(file: &'static str, text: &str) -> Result<Vec<Signature>, String> {
        let text = text.replace("\\\n", "\n");
        let marker = "extern \"C\" __global__ void";
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find(marker) {
            let mut t = rest[i + marker.len()..].trim_start();
            if let Some(lb) = t.strip_prefix("__launch_bounds__") {
                t = parens(lb.trim_start())
                    .ok_or(format!("{file}: unclosed __launch_bounds__"))?
                    .1
                    .trim_start();
            }
            let open = t.find('(').ok_or(format!("{file}: no parameter list"))?;
            let name = t[..open].trim();
            let (list, after) = parens(&t[open..]).ok_or(format!("{file}: {name}: unclosed"))?;
            // Macro parameters (upper case) pasted into a family's names become `{}`.
            let kernel: String = name
                .split("##")
                .map(|piece| {
                    let piece = piece.trim();
                    if piece.starts_with(|c: char| c.is_ascii_uppercase())
                        && piece
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    {
                        "{}"
                    } else {
                        piece
                    }
                })
                .collect();
            let mut params = Vec::new();
            for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let split = p
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .ok_or(format!("{file}: {name}: parameter {p:?} has no type"))?;
                let ty = c_type(&p[..=split]).map_err(|e| format!("{file}: {name}: {e}"))?;
                params.push((p[split + 1..].to_string(), ty));
            }
            out.push(Signature {
                file,
                kernel,
                params,
            });
            rest = after;
        }
        Ok(out)
    }

    fn all_signatures() -> Vec<Signature> {
        SOURCES
            .iter()
            .flat_map(|s| signatures(s.name, s.text).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    /// Whether kernel `name` is an instance of `pattern` (`{}`: one or more name characters).
    fn instance_of(name: &str, pattern: &str) -> bool {
        match pattern.split_once("{}") {
            None => name == pattern,
            Some((lit, rest)) => name.strip_prefix(lit).is_some_and(|tail| {
                (1..=tail.len()).any(|k| {
                    tail[..k]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && instance_of(&tail[k..], rest)
                })
            }),
        }
    }

    /// How `declared` differs from the signatures (empty: it matches exactly one).
    fn mismatches(sigs: &[Signature], declared: &[Declared]) -> Vec<String> {
        let mut errs = Vec::new();
        for sig in sigs {
            let mine: Vec<&Declared> = declared.iter().filter(|d| d.kernel == sig.kernel).collect();
            let [d] = mine[..] else {
                errs.push(format!(
                    "{} ({}) has {} launchers, not one",
                    sig.kernel,
                    sig.file,
                    mine.len()
                ));
                continue;
            };
            let theirs: Vec<(&str, Ty)> = sig
                .params
                .iter()
                .map(|(n, t)| (n.as_str(), t.clone()))
                .collect();
            let ours: Vec<(&str, Ty)> = d.params.iter().map(|&(n, t)| (n, rust_type(t))).collect();
            if theirs != ours {
                errs.push(format!(
                    "launcher {} declares ({}), kernel {} ({}) takes ({})",
                    d.launcher,
                    show(&ours),
                    sig.kernel,
                    sig.file,
                    show(&theirs)
                ));
            }
            if !sig.kernel.contains("{}") && d.launcher != sig.kernel {
                errs.push(format!(
                    "kernel {} is launched by {}: a plain kernel's launcher has its name",
                    sig.kernel, d.launcher
                ));
            }
        }
        for d in declared {
            if !sigs.iter().any(|s| s.kernel == d.kernel) {
                errs.push(format!(
                    "launcher {} names {}, which no source defines",
                    d.launcher, d.kernel
                ));
            }
        }
        errs
    }

    #[test]
    fn every_kernel_has_one_launcher_with_its_signature() {
        let sigs = all_signatures();
        assert!(sigs.len() >= 40, "{} signatures parsed", sigs.len());
        let errs = mismatches(&sigs, DECLARED);
        assert!(errs.is_empty(), "{}", errs.join("\n"));
        // Every kernel the module loader finds (families expanded) is an instance of a launcher.
        for src in SOURCES {
            for name in kernel_names(src.text) {
                assert!(
                    DECLARED.iter().any(|d| instance_of(&name, d.kernel)),
                    "kernel {name} ({}) has no launcher",
                    src.name
                );
            }
        }
    }

    /// The comparison catches what a stale launcher would get wrong: two parameters swapped, a
    /// type or constness changed, a parameter missing, a kernel without launcher or with two.
    #[test]
    fn signature_check_catches_mismatches() {
        let src = "extern \"C\" __global__ void __launch_bounds__(A * 32)\n\
                   k(const float* __restrict__ x, int n, u16* y, RopeP r) {}\n\
                   #define F(NAME, T) \\\n  extern \"C\" __global__ void f_##NAME##_1k(i64 n) {}\n";
        let sigs = signatures("t.cu", src).unwrap();
        assert_eq!(sigs[1].kernel, "f_{}_1k");
        let good: &[(&str, &str)] = &[
            ("x", "*const f32"),
            ("n", "i32"),
            ("y", "*mut u16"),
            ("r", "RopeKArg"),
        ];
        let fam = Declared {
            launcher: "f_1k",
            kernel: "f_{}_1k",
            params: &[("n", "i64")],
        };
        let with = |params: &'static [(&'static str, &'static str)]| {
            mismatches(
                &sigs,
                &[
                    Declared {
                        launcher: "k",
                        kernel: "k",
                        params,
                    },
                    fam,
                ],
            )
        };
        assert_eq!(with(good), Vec::<String>::new());
        let bad: [&'static [(&str, &str)]; 5] = [
            &[
                ("n", "i32"),
                ("x", "*const f32"),
                ("y", "*mut u16"),
                ("r", "RopeKArg"),
            ],
            &[
                ("x", "*const f32"),
                ("n", "u32"),
                ("y", "*mut u16"),
                ("r", "RopeKArg"),
            ],
            &[
                ("x", "*mut f32"),
                ("n", "i32"),
                ("y", "*mut u16"),
                ("r", "RopeKArg"),
            ],
            &[
                ("x", "*const f32"),
                ("n", "i32"),
                ("y", "*mut u8"),
                ("r", "RopeKArg"),
            ],
            &[("x", "*const f32"), ("n", "i32"), ("y", "*mut u16")],
        ];
        for b in bad {
            assert_eq!(with(b).len(), 1, "{b:?}");
        }
        // No launcher, two launchers, a launcher of nothing.
        assert_eq!(mismatches(&sigs, &[fam]).len(), 1);
        let twice = [fam, fam];
        assert_eq!(mismatches(&sigs[1..], &twice).len(), 1);
        let stray = Declared {
            launcher: "g",
            kernel: "g",
            params: &[],
        };
        assert_eq!(mismatches(&sigs[1..], &[fam, stray]).len(), 1);
        // Unknown C types are refused rather than matched loosely.
        assert!(signatures("t.cu", "extern \"C\" __global__ void z(double v) {}").is_err());
    }

    #[test]
    fn family_patterns_match_their_instances() {
        assert!(instance_of("gemvq_q4_k_8r2w4", "gemvq_{}_{}r{}w{}"));
        assert!(instance_of("mmq_iq4_xs_128x64", "mmq_{}_{}x{}"));
        assert!(instance_of("flash_attn_q8_128", "flash_attn_{}"));
        assert!(instance_of("flash_attn_q8_128", "flash_attn_q8_{}"));
        assert!(!instance_of("gemv_f16_1k", "gemv_{}_{}r{}"));
        assert!(!instance_of("dequant_", "dequant_{}"));
        assert!(!instance_of("rope_heads", "rope"));
    }
}
