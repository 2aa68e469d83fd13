//! GGUF loader tests: hand-made blocks of every supported type against the reference formulas
//! written out here independently, exact `get_q8` conversion, sharding, metadata, bad input and
//! byte-mutation robustness, and the real SmolLM2 file against values from Python's `gguf`.
#![allow(clippy::unwrap_used)]
// The encoders index values by their position e, mirroring the layout descriptions.
#![allow(clippy::needless_range_loop)]

mod loader_common;

use half::{bf16, f16};
use loader_common::gguf_writer::GgufWriter;
use loader_common::{Rng, smollm2_gguf, temp_dir};
use triton_ferrum::loader::gguf::{GgmlType, GgufFile, MetadataValue, convert_to_q8, dequantize};
use triton_ferrum::loader::{LoadError, Shard, SourceDType, TensorSource};
use triton_ferrum::ops::quant::BlockQ8;

// ---------------------------------------------------------------------------------------------
// Hand-made blocks. Each encoder takes chosen parameters and quants in value order, packs them the
// way the ggml block struct stores them, and returns (bytes, expected values by the formula).
// ---------------------------------------------------------------------------------------------

fn h(v: f32) -> (f32, [u8; 2]) {
    let x = f16::from_f32(v);
    (x.to_f32(), x.to_le_bytes())
}

fn q4_0_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.1);
    let q: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
    let mut b = db.to_vec();
    b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    let y = q.iter().map(|&q| (q as i32 - 8) as f32 * d).collect();
    (b, y)
}

fn q4_1_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.1);
    let (m, mb) = h(rng.unit());
    let q: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
    let mut b = [db, mb].concat();
    b.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
    let y = q.iter().map(|&q| q as f32 * d + m).collect();
    (b, y)
}

/// Q5_0 (`with_min` false) or Q5_1: qh bit e holds bit 4 of value e.
fn q5_block(rng: &mut Rng, with_min: bool) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.1);
    let (m, mb) = h(rng.unit());
    let q: Vec<u8> = (0..32).map(|_| rng.below(32) as u8).collect();
    let qh: u32 = (0..32).map(|e| u32::from(q[e] >> 4) << e).sum();
    let mut b = db.to_vec();
    if with_min {
        b.extend(mb);
    }
    b.extend(qh.to_le_bytes());
    b.extend((0..16).map(|j| (q[j] & 15) | ((q[j + 16] & 15) << 4)));
    let y = if with_min {
        q.iter().map(|&q| q as f32 * d + m).collect()
    } else {
        q.iter().map(|&q| (q as i32 - 16) as f32 * d).collect()
    };
    (b, y)
}

fn q8_0_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.01);
    let q: Vec<i8> = (0..32).map(|_| rng.range(-128, 128) as i8).collect();
    let mut b = db.to_vec();
    b.extend(q.iter().map(|&q| q as u8));
    (b, q.iter().map(|&q| q as f32 * d).collect())
}

/// Position of value `e` of a 256-value Q2_K/Q3_K block in the 2-bit quant array: byte and shift.
fn two_bit_pos(e: usize) -> (usize, usize) {
    let (half, r) = (e / 128, e % 128);
    (32 * half + r % 32, 2 * (r / 32))
}

fn q2_k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.1);
    let (dmin, dminb) = h(rng.unit() * 0.1);
    let sc: Vec<u8> = (0..16).map(|_| rng.below(16) as u8).collect();
    let mn: Vec<u8> = (0..16).map(|_| rng.below(16) as u8).collect();
    let q: Vec<u8> = (0..256).map(|_| rng.below(4) as u8).collect();
    let mut qs = [0u8; 64];
    for e in 0..256 {
        let (byte, shift) = two_bit_pos(e);
        qs[byte] |= q[e] << shift;
    }
    let mut b: Vec<u8> = (0..16).map(|i| sc[i] | (mn[i] << 4)).collect();
    b.extend(qs);
    b.extend(db);
    b.extend(dminb);
    let y = (0..256)
        .map(|e| (d * sc[e / 16] as f32) * q[e] as f32 - dmin * mn[e / 16] as f32)
        .collect();
    (b, y)
}

fn q3_k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.1);
    let sc: Vec<i32> = (0..16).map(|_| rng.range(-32, 32) as i32).collect();
    let q: Vec<i32> = (0..256).map(|_| rng.range(-4, 4) as i32).collect();
    let (mut hmask, mut qs, mut scales) = ([0u8; 32], [0u8; 64], [0u8; 12]);
    for e in 0..256 {
        // q = low - 4 when the hmask bit is clear, q = low when set.
        let (low, high) = if q[e] >= 0 { (q[e], 1) } else { (q[e] + 4, 0) };
        let (byte, shift) = two_bit_pos(e);
        qs[byte] |= (low as u8) << shift;
        let (half, r) = (e / 128, e % 128);
        hmask[r % 32] |= high << (4 * half + r / 32);
    }
    for (i, &s) in sc.iter().enumerate() {
        let v = (s + 32) as u8; // 6 bits
        scales[i % 8] |= (v & 15) << (4 * (i / 8));
        scales[8 + i % 4] |= (v >> 4) << (2 * (i / 4));
    }
    let mut b = hmask.to_vec();
    b.extend(qs);
    b.extend(scales);
    b.extend(db);
    let y = (0..256)
        .map(|e| (d * sc[e / 16] as f32) * q[e] as f32)
        .collect();
    (b, y)
}

/// Packs 8 six-bit scales and mins of a Q4_K/Q5_K block into its 12 scale bytes.
fn pack_k4_scales(sc: &[u8], mn: &[u8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    out
}

/// Q4_K (`five_bit` false) or Q5_K. Value e sits in chunk e / 64: the low nibbles of
/// qs[32c..32c + 32] hold its first 32 values, the high nibbles the next 32; Q5_K keeps bit 4 of
/// those in bits 2c and 2c + 1 of qh[l].
fn k4_block(rng: &mut Rng, five_bit: bool) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.05);
    let (dmin, dminb) = h(rng.unit() * 0.05);
    let sc: Vec<u8> = (0..8).map(|_| rng.below(64) as u8).collect();
    let mn: Vec<u8> = (0..8).map(|_| rng.below(64) as u8).collect();
    let levels = if five_bit { 32 } else { 16 };
    let q: Vec<u8> = (0..256).map(|_| rng.below(levels) as u8).collect();
    let (mut qs, mut qh) = ([0u8; 128], [0u8; 32]);
    for e in 0..256 {
        let (chunk, r) = (e / 64, e % 64);
        let (l, upper) = (r % 32, r / 32);
        qs[32 * chunk + l] |= (q[e] & 15) << (4 * upper);
        qh[l] |= (q[e] >> 4) << (2 * chunk + upper);
    }
    let mut b = [db, dminb].concat();
    b.extend(pack_k4_scales(&sc, &mn));
    if five_bit {
        b.extend(qh);
    }
    b.extend(qs);
    let y = (0..256)
        .map(|e| (d * sc[e / 32] as f32) * q[e] as f32 - dmin * mn[e / 32] as f32)
        .collect();
    (b, y)
}

/// Q6_K: value e of half h, quarter k = (e % 128) / 32, lane l = e % 32 keeps its low 4 bits in
/// ql[64h + 32(k % 2) + l] (nibble k / 2) and its high 2 bits at bit 2k of qh[32h + l].
fn q6_k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (d, db) = h(rng.unit() * 0.01);
    let sc: Vec<i8> = (0..16).map(|_| rng.range(-128, 128) as i8).collect();
    let q: Vec<i32> = (0..256).map(|_| rng.range(-32, 32) as i32).collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for e in 0..256 {
        let v = (q[e] + 32) as u8;
        let (half, r) = (e / 128, e % 128);
        let (k, l) = (r / 32, r % 32);
        ql[64 * half + 32 * (k % 2) + l] |= (v & 15) << (4 * (k / 2));
        qh[32 * half + l] |= (v >> 4) << (2 * k);
    }
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend(db);
    let y = (0..256)
        .map(|e| d * sc[e / 16] as f32 * q[e] as f32)
        .collect();
    (b, y)
}

fn q8_k_block(rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let d = rng.unit() * 0.01;
    let q: Vec<i8> = (0..256).map(|_| rng.range(-128, 128) as i8).collect();
    let mut b = d.to_le_bytes().to_vec();
    b.extend(q.iter().map(|&q| q as u8));
    b.extend([0u8; 32]); // bsums: unused by dequantization
    (b, q.iter().map(|&q| d * q as f32).collect())
}

fn plain_block(rng: &mut Rng, ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let v = rng.unit() * 3.0;
    match ty {
        GgmlType::F32 => (v.to_le_bytes().to_vec(), vec![v]),
        GgmlType::F16 => (
            f16::from_f32(v).to_le_bytes().to_vec(),
            vec![f16::from_f32(v).to_f32()],
        ),
        _ => (
            bf16::from_f32(v).to_le_bytes().to_vec(),
            vec![bf16::from_f32(v).to_f32()],
        ),
    }
}

fn make_block(ty: GgmlType, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    match ty {
        GgmlType::Q4_0 => q4_0_block(rng),
        GgmlType::Q4_1 => q4_1_block(rng),
        GgmlType::Q5_0 => q5_block(rng, false),
        GgmlType::Q5_1 => q5_block(rng, true),
        GgmlType::Q8_0 => q8_0_block(rng),
        GgmlType::Q2_K => q2_k_block(rng),
        GgmlType::Q3_K => q3_k_block(rng),
        GgmlType::Q4_K => k4_block(rng, false),
        GgmlType::Q5_K => k4_block(rng, true),
        GgmlType::Q6_K => q6_k_block(rng),
        GgmlType::Q8_K => q8_k_block(rng),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => plain_block(rng, ty),
        other => panic!("no encoder for {other}"),
    }
}

/// `num_blocks` random blocks of `ty`: (bytes, expected values).
fn make_blocks(ty: GgmlType, num_blocks: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut values) = (Vec::new(), Vec::new());
    for _ in 0..num_blocks {
        let (b, y) = make_block(ty, rng);
        assert_eq!(b.len(), ty.type_size().unwrap(), "{ty} encoder size");
        assert_eq!(y.len(), ty.block_size().unwrap());
        bytes.extend(b);
        values.extend(y);
    }
    (bytes, values)
}

fn assert_bits_eq(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            a.to_bits() == e.to_bits(),
            "{what}: value {i}: got {a:e}, expected {e:e}"
        );
    }
}

#[test]
fn dequantize_matches_reference_formulas_for_every_type() {
    let mut rng = Rng::new(1);
    for &ty in GgmlType::DEQUANTIZABLE {
        for _ in 0..20 {
            let (bytes, expected) = make_blocks(ty, 3, &mut rng);
            let mut out = vec![f32::NAN; expected.len()];
            dequantize(ty, &bytes, &mut out).unwrap();
            assert_bits_eq(&out, &expected, &ty.to_string());
        }
    }
}

#[test]
fn dequantize_rejects_bad_lengths_and_unsupported_types() {
    let mut out = vec![0.0; 32];
    let err = dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out).unwrap_err();
    assert!(err.to_string().contains("17 bytes of Q4_0"), "{err}");
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out[..31]).is_err());
    let err = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0.0; 256]).unwrap_err();
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    assert!(dequantize(GgmlType(1234), &[], &mut []).is_err());
    let mut blocks = vec![
        BlockQ8 {
            scale: 0.0,
            min: 0.0,
            qs: [0; 32]
        };
        1
    ];
    assert!(convert_to_q8(GgmlType::Q6_K, &[0u8; 210], &mut blocks).is_err());
    assert!(convert_to_q8(GgmlType::Q4_0, &[0u8; 36], &mut blocks).is_err());
}

#[test]
fn type_table_names_and_sizes() {
    assert_eq!(GgmlType::Q4_K.name(), Some("Q4_K"));
    assert_eq!(
        (GgmlType::Q6_K.block_size(), GgmlType::Q6_K.type_size()),
        (Some(256), Some(210))
    );
    assert_eq!(
        (GgmlType::Q5_1.block_size(), GgmlType::Q5_1.type_size()),
        (Some(32), Some(24))
    );
    assert_eq!(GgmlType::BF16.0, 30);
    assert_eq!(GgmlType(77).name(), None);
    assert_eq!(GgmlType(77).to_string(), "unknown ggml type 77");
    assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
    assert_eq!(GgmlType::Q4_K.bytes_for(500), None);
}

fn dequant_q8(blocks: &[BlockQ8]) -> Vec<f32> {
    blocks
        .iter()
        .flat_map(|b| b.qs.map(|q| b.scale * q as f32 + b.min))
        .collect()
}

/// A GGUF with one `[rows, cols]` tensor per Q8-convertible type, named by the type; returns the
/// file and the expected values of each tensor.
fn q8_convertible_file(rows: usize, cols: usize) -> (GgufFile, Vec<(String, Vec<f32>)>) {
    let mut rng = Rng::new(7);
    let mut w = GgufWriter::new();
    let mut expected = Vec::new();
    for &ty in GgmlType::Q8_CONVERTIBLE {
        let num_blocks = rows * cols / ty.block_size().unwrap();
        let (bytes, values) = make_blocks(ty, num_blocks, &mut rng);
        w.tensor_raw(&ty.to_string(), &[rows, cols], ty, bytes);
        expected.push((ty.to_string(), values));
    }
    (
        GgufFile::from_bytes("q8", w.to_bytes().unwrap()).unwrap(),
        expected,
    )
}

#[test]
fn get_q8_is_exactly_get_for_every_convertible_type() {
    let (rows, cols) = (4, 512);
    let (file, expected) = q8_convertible_file(rows, cols);
    for (name, values) in &expected {
        let full = file.get(name, Shard::Replicated).unwrap();
        assert_eq!(full.shape, vec![rows, cols]);
        assert_bits_eq(&full.data, values, name);
        let q8 = file.get_q8(name, Shard::Replicated).unwrap().unwrap();
        assert_eq!(
            (q8.rows, q8.cols, q8.blocks.len()),
            (rows, cols, rows * cols / 32)
        );
        // scale * q + min equals the dequantized value (for min == 0, up to the sign of zero).
        let from_q8 = dequant_q8(&q8.blocks);
        for (i, (a, b)) in from_q8.iter().zip(&full.data).enumerate() {
            assert!(a == b, "{name}: value {i}: q8 {a:e} vs get {b:e}");
        }
        for shard in [
            Shard::Column {
                rank: 1,
                world_size: 2,
            },
            Shard::Row {
                rank: 1,
                world_size: 2,
            },
            Shard::Row {
                rank: 3,
                world_size: 4,
            }, // 128 columns: starts inside a K super-block
            Shard::Row {
                rank: 5,
                world_size: 16,
            },
            // A tensor-parallel rank's rows (a vocabulary slice) and input columns.
            Shard::OutRange { start: 1, len: 3 },
            Shard::InRange { start: 96, len: 64 },
        ] {
            let got = file.get(name, shard).unwrap();
            let q8 = file.get_q8(name, shard).unwrap().unwrap();
            assert_eq!(vec![q8.rows, q8.cols], got.shape, "{name} {shard:?}");
            let from_q8 = dequant_q8(&q8.blocks);
            assert!(
                from_q8.iter().zip(&got.data).all(|(a, b)| a == b),
                "{name} {shard:?}"
            );
        }
    }
    // A shard narrower than one 32-wide block cannot be represented.
    let err = file
        .get_q8(
            "Q4_0",
            Shard::Row {
                rank: 0,
                world_size: 32,
            },
        )
        .unwrap_err();
    assert!(matches!(err, LoadError::BadShard { .. }), "{err}");
}

#[test]
fn get_q8_is_none_for_other_types() {
    let mut rng = Rng::new(3);
    let mut w = GgufWriter::new();
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q6_K,
        GgmlType::Q2_K,
    ] {
        let (bytes, _) = make_blocks(ty, 256 / ty.block_size().unwrap() * 2, &mut rng);
        w.tensor_raw(&ty.to_string(), &[2, 256], ty, bytes);
    }
    let file = GgufFile::from_bytes("other", w.to_bytes().unwrap()).unwrap();
    for name in file.names() {
        assert!(
            file.get_q8(&name, Shard::Replicated).unwrap().is_none(),
            "{name}"
        );
    }
    assert!(matches!(
        file.get_q8("nope", Shard::Replicated),
        Err(LoadError::MissingTensor { .. })
    ));
}

#[test]
fn sharded_get_slices_the_full_tensor() {
    let mut rng = Rng::new(11);
    let mut w = GgufWriter::new();
    let (q_bytes, q_values) = make_blocks(GgmlType::Q4_K, 6, &mut rng);
    w.tensor_raw("wk", &[3, 512], GgmlType::Q4_K, q_bytes);
    let dense: Vec<f32> = (0..24).map(|i| i as f32).collect();
    w.tensor_f32("w", &[4, 6], &dense);
    w.tensor_f32("bias", &[6], &dense[..6]);
    let file = GgufFile::from_bytes("shard", w.to_bytes().unwrap()).unwrap();

    let col = file
        .get(
            "w",
            Shard::Column {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
    assert_eq!((col.shape, col.data), (vec![2, 6], dense[12..].to_vec()));
    let row = file
        .get(
            "w",
            Shard::Row {
                rank: 1,
                world_size: 3,
            },
        )
        .unwrap();
    assert_eq!(row.shape, vec![4, 2]);
    assert_eq!(row.data, vec![2.0, 3.0, 8.0, 9.0, 14.0, 15.0, 20.0, 21.0]);
    let bias = file
        .get(
            "bias",
            Shard::Row {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
    assert_eq!(bias.data, dense[..6].to_vec());
    let bias = file
        .get(
            "bias",
            Shard::Column {
                rank: 2,
                world_size: 3,
            },
        )
        .unwrap();
    assert_eq!(bias.data, vec![4.0, 5.0]);

    // Quantized, Row split at 96 columns: runs start and end inside blocks.
    let got = file
        .get(
            "wk",
            Shard::Row {
                rank: 2,
                world_size: 4,
            },
        )
        .unwrap();
    assert_eq!(got.shape, vec![3, 128]);
    let want: Vec<f32> = (0..3)
        .flat_map(|r| q_values[r * 512 + 256..r * 512 + 384].to_vec())
        .collect();
    assert_bits_eq(&got.data, &want, "wk row shard");

    let err = file
        .get(
            "w",
            Shard::Column {
                rank: 0,
                world_size: 3,
            },
        )
        .unwrap_err();
    assert!(matches!(err, LoadError::BadShard { .. }), "{err}");
    assert!(
        err.to_string().contains("'w'") && err.to_string().contains("[4, 6]"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Metadata and layout
// ---------------------------------------------------------------------------------------------

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata(
        "general.architecture",
        MetadataValue::String("llama".into()),
    )
    .metadata("llama.block_count", MetadataValue::U32(2))
    .metadata("llama.rope.freq_base", MetadataValue::F32(10000.0))
    .metadata("neg", MetadataValue::I32(-3))
    .metadata("flag", MetadataValue::Bool(true))
    .metadata("big", MetadataValue::U64(1 << 40))
    .metadata("f64", MetadataValue::F64(2.5))
    .metadata("small", MetadataValue::U8(7))
    .metadata(
        "tokens",
        MetadataValue::Array(vec![
            MetadataValue::String("a".into()),
            MetadataValue::String("bc".into()),
        ]),
    )
    .metadata(
        "scores",
        MetadataValue::Array(vec![MetadataValue::F32(0.5), MetadataValue::F32(-1.0)]),
    )
    .metadata(
        "nested",
        MetadataValue::Array(vec![
            MetadataValue::Array(vec![MetadataValue::I16(1), MetadataValue::I16(-2)]),
            MetadataValue::Array(vec![MetadataValue::I16(3)]),
        ]),
    );
    let mut rng = Rng::new(5);
    let (q4, _) = make_blocks(GgmlType::Q4_0, 4, &mut rng);
    w.tensor_raw("blk.0.w", &[2, 64], GgmlType::Q4_0, q4);
    w.tensor_f32("norm", &[3], &[1.0, 2.0, 3.0]);
    let (k, _) = make_blocks(GgmlType::Q6_K, 1, &mut rng);
    w.tensor_raw("blk.0.k", &[1, 256], GgmlType::Q6_K, k);
    w.tensor_f32("last", &[2, 2], &[1.0, -1.0, 0.5, 4.0]);
    w
}

#[test]
fn parses_metadata_and_tensor_infos() {
    let bytes = sample_writer().to_bytes().unwrap();
    let dir = temp_dir("gguf-parse");
    let path = dir.join("m.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset() % 32, 0);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count").unwrap(), Some(2));
    assert_eq!(file.get_usize("small").unwrap(), Some(7));
    assert_eq!(file.get_u64("absent").unwrap(), None);
    assert_eq!(file.get_f32("llama.rope.freq_base").unwrap(), Some(10000.0));
    assert_eq!(file.get_f32("f64").unwrap(), Some(2.5));
    assert_eq!(file.get_i64("neg").unwrap(), Some(-3));
    assert_eq!(file.get_bool("flag").unwrap(), Some(true));
    assert_eq!(file.get_u64("big").unwrap(), Some(1 << 40));
    assert_eq!(file.get_str_array("tokens").unwrap(), Some(vec!["a", "bc"]));
    assert_eq!(file.get_f32_array("scores").unwrap(), Some(vec![0.5, -1.0]));
    let nested = file.get_array("nested").unwrap().unwrap();
    assert_eq!(
        nested[0],
        MetadataValue::Array(vec![MetadataValue::I16(1), MetadataValue::I16(-2)])
    );
    assert_eq!(file.metadata().len(), 11);

    // Wrong types are errors naming the key and the value found.
    let err = file.get_u64("neg").unwrap_err();
    assert!(matches!(err, LoadError::BadMetadata { .. }));
    assert!(
        err.to_string().contains("'neg'") && err.to_string().contains("-3"),
        "{err}"
    );
    let err = file.get_str("flag").unwrap_err().to_string();
    assert!(
        err.contains("'flag'") && err.contains("bool") && err.contains("m.gguf"),
        "{err}"
    );
    assert!(file.get_bool("tokens").is_err());
    assert!(file.get_str_array("scores").is_err());

    let infos = file.tensor_infos();
    assert_eq!(infos.len(), 4);
    assert_eq!(infos[0].name, "blk.0.w");
    assert_eq!(infos[0].ne, vec![64, 2]);
    assert_eq!(infos[0].shape, vec![2, 64]);
    assert_eq!(infos[0].num_bytes, 4 * 18);
    assert!(infos.iter().all(|t| t.offset % 32 == 0));
    assert_eq!(file.names(), vec!["blk.0.k", "blk.0.w", "last", "norm"]);
    let info = file.info("blk.0.w").unwrap();
    assert_eq!(
        (info.shape, info.dtype),
        (vec![2, 64], SourceDType::Ggml(GgmlType::Q4_0))
    );
    assert_eq!(file.info("norm").unwrap().dtype, SourceDType::F32);
    assert!(file.contains("last") && !file.contains("nope"));
    assert_eq!(
        file.get("last", Shard::Replicated).unwrap().data,
        vec![1.0, -1.0, 0.5, 4.0]
    );
    assert_eq!(file.tensor_bytes("norm").unwrap().len(), 12);
    assert!(file.describe().contains("m.gguf"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_2_and_custom_alignment() {
    let mut w = sample_writer();
    w.version(2).alignment(64);
    let file = GgufFile::from_bytes("v2", w.to_bytes().unwrap()).unwrap();
    assert_eq!((file.version(), file.alignment()), (2, 64));
    assert_eq!(file.data_offset() % 64, 0);
    assert!(file.tensor_infos().iter().all(|t| t.offset % 64 == 0));
    assert_eq!(
        file.get("norm", Shard::Replicated).unwrap().data,
        vec![1.0, 2.0, 3.0]
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

fn open_err(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes("bad", bytes) {
        Ok(_) => panic!("bad file opened"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("<memory:bad>"),
                "error does not name the file: {msg}"
            );
            msg
        }
    }
}

/// Byte offset of the first occurrence of `needle`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn truncated_files_are_errors_at_every_cut() {
    let bytes = sample_writer().to_bytes().unwrap();
    for cut in 0..bytes.len() {
        open_err(bytes[..cut].to_vec());
    }
    // Through the file system too, at a few cuts.
    let dir = temp_dir("gguf-trunc");
    for cut in [0, 3, 10, 100, bytes.len() / 2, bytes.len() - 1] {
        let path = dir.join(format!("cut{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("cut{cut}.gguf")), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_magic_version_and_endianness() {
    let good = sample_writer().to_bytes().unwrap();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(open_err(b).contains("bad magic"));
    for (version, needle) in [
        (1u32, "version 1"),
        (4, "version 4"),
        (0x0300_0000, "big-endian"),
    ] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&version.to_le_bytes());
        let msg = open_err(b);
        assert!(msg.contains(needle), "{msg}");
    }
    let dir = temp_dir("gguf-missing");
    let err = GgufFile::open(dir.join("none.gguf")).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }) && err.to_string().contains("none.gguf"));
}

#[test]
fn absurd_counts_and_lengths_are_errors() {
    let good = sample_writer().to_bytes().unwrap();
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(b).contains("tensor count 18446744073709551615"));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(open_err(b).contains("metadata count"));
    // The first key's length.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(open_err(b).contains("length"));
    // An array length far beyond the file.
    let mut b = good.clone();
    let at = find(&b, b"tokens") + 6 + 4 + 4; // key, value type (array), element type
    b[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let msg = open_err(b);
    assert!(
        msg.contains("'tokens'") && msg.contains("array length"),
        "{msg}"
    );
}

#[test]
fn bad_metadata_values_are_errors_naming_the_key() {
    let mut w = GgufWriter::new();
    w.metadata("flag", MetadataValue::Bool(true));
    let mut b = w.to_bytes().unwrap();
    let last = b.len() - 1;
    b[last] = 2;
    let msg = open_err(b);
    assert!(msg.contains("'flag'") && msg.contains("is 2"), "{msg}");

    let mut w = GgufWriter::new();
    w.metadata("k", MetadataValue::U8(1))
        .metadata("k", MetadataValue::U8(2));
    assert!(open_err(w.to_bytes().unwrap()).contains("duplicate key"));

    let mut w = GgufWriter::new();
    w.metadata("general.alignment", MetadataValue::U32(24));
    let msg = open_err(w.to_bytes().unwrap());
    assert!(
        msg.contains("general.alignment") && msg.contains("24"),
        "{msg}"
    );

    let mut w = GgufWriter::new();
    w.metadata("x", MetadataValue::U32(1));
    let mut b = w.to_bytes().unwrap();
    let at = find(&b, b"x") + 1;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(open_err(b).contains("unknown value type 99"));

    let mut w = GgufWriter::new();
    w.metadata("s", MetadataValue::String("ab".into()));
    let mut b = w.to_bytes().unwrap();
    let last = b.len() - 1;
    b[last] = 0xff;
    assert!(open_err(b).contains("UTF-8"));

    // Arrays nested 20 deep.
    let mut v = MetadataValue::U8(0);
    for _ in 0..20 {
        v = MetadataValue::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.metadata("deep", v);
    assert!(open_err(w.to_bytes().unwrap()).contains("nested"));

    let mut w = GgufWriter::new();
    w.metadata(
        "mixed",
        MetadataValue::Array(vec![MetadataValue::U8(0), MetadataValue::I8(0)]),
    );
    assert!(w.to_bytes().is_err());
}

#[test]
fn bad_tensor_infos_are_errors_naming_the_tensor() {
    // Data past the end of the file: the declared shape needs more bytes than are written.
    let mut w = GgufWriter::new();
    w.tensor_raw("big", &[4, 64], GgmlType::Q8_0, vec![0u8; 34 * 2]);
    let msg = open_err(w.to_bytes().unwrap());
    assert!(
        msg.contains("'big'") && msg.contains("past the end"),
        "{msg}"
    );

    let mut w = GgufWriter::new();
    w.tensor_raw("odd", &[1, 48], GgmlType::Q4_0, vec![0u8; 36]);
    let msg = open_err(w.to_bytes().unwrap());
    assert!(
        msg.contains("'odd'") && msg.contains("48") && msg.contains("block size 32"),
        "{msg}"
    );

    let mut w = GgufWriter::new();
    w.tensor_f32("a", &[2], &[1.0, 2.0])
        .tensor_f32("a", &[2], &[1.0, 2.0]);
    assert!(open_err(w.to_bytes().unwrap()).contains("duplicate tensor name"));

    let mut w = GgufWriter::new();
    w.tensor_f32("u", &[2], &[1.0, 2.0]);
    let good = w.to_bytes().unwrap();
    let info = find(&good, b"u") + 1; // n_dims, ne[0], type, offset
    let mut b = good.clone();
    b[info..info + 4].copy_from_slice(&5u32.to_le_bytes());
    assert!(open_err(b).contains("n_dims 5"));
    let mut b = good.clone();
    b[info + 12..info + 16].copy_from_slice(&99u32.to_le_bytes());
    let msg = open_err(b);
    assert!(
        msg.contains("'u'") && msg.contains("unknown ggml type 99"),
        "{msg}"
    );
    let mut b = good.clone();
    b[info + 16..info + 24].copy_from_slice(&8u64.to_le_bytes());
    assert!(open_err(b).contains("not a multiple of the alignment 32"));
    let mut b = good.clone();
    b[info + 4..info + 12].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(b).contains("'u'"));
    let mut b = good.clone();
    b[info + 16..info + 24].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    assert!(open_err(b).contains("past the end"));

    // Two tensors sharing bytes.
    let mut w = GgufWriter::new();
    w.tensor_f32("p", &[16], &[0.0; 16])
        .tensor_f32("q", &[16], &[0.0; 16]);
    let mut b = w.to_bytes().unwrap();
    let at = find(&b, b"q") + 1 + 4 + 8 + 4;
    b[at..at + 8].copy_from_slice(&0u64.to_le_bytes()); // q's offset := p's
    let msg = open_err(b);
    assert!(msg.contains("overlaps"), "{msg}");
}

#[test]
fn unsupported_types_and_missing_tensors() {
    let mut w = GgufWriter::new();
    w.tensor_raw("iq", &[1, 256], GgmlType::IQ2_XXS, vec![0u8; 66]);
    let file = GgufFile::from_bytes("iq", w.to_bytes().unwrap()).unwrap();
    assert_eq!(
        file.info("iq").unwrap().dtype,
        SourceDType::Ggml(GgmlType::IQ2_XXS)
    );
    let err = file.get("iq", Shard::Replicated).unwrap_err();
    assert!(matches!(err, LoadError::UnsupportedType { .. }));
    let msg = err.to_string();
    assert!(msg.contains("'iq'") && msg.contains("IQ2_XXS"), "{msg}");
    assert!(file.get_q8("iq", Shard::Replicated).unwrap().is_none());
    let err = file.get("model.missing", Shard::Replicated).unwrap_err();
    assert!(matches!(err, LoadError::MissingTensor { .. }));
    assert!(err.to_string().contains("'model.missing'") && err.to_string().contains("<memory:iq>"));
    assert!(file.tensor_bytes("model.missing").is_err());
}

#[test]
fn random_byte_mutations_never_panic() {
    let good = sample_writer().to_bytes().unwrap();
    let mut rng = Rng::new(0x5eed);
    let (mut num_opened, mut num_read) = (0, 0);
    for _ in 0..5000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(4) {
            if b.is_empty() {
                break;
            }
            let at = rng.below(b.len() as u64) as usize;
            match rng.below(4) {
                0 => b[at] = rng.next_u64() as u8,
                1 => b[at] ^= 1 << rng.below(8),
                2 => b[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4) as usize],
                _ => b.truncate(at),
            }
        }
        if let Ok(file) = GgufFile::from_bytes("fuzz", b) {
            num_opened += 1;
            let _ = file.architecture();
            for key in file.metadata().keys() {
                let _ = (
                    file.get_u64(key),
                    file.get_str(key),
                    file.get_f32_array(key),
                );
            }
            for name in file.names() {
                for shard in [
                    Shard::Replicated,
                    Shard::Column {
                        rank: 1,
                        world_size: 2,
                    },
                    Shard::Row {
                        rank: 0,
                        world_size: 2,
                    },
                ] {
                    num_read += usize::from(file.get(&name, shard).is_ok());
                    let _ = file.get_q8(&name, shard);
                }
            }
        }
    }
    // The mutations hit data bytes often enough that some files still open and read.
    assert!(
        num_opened > 100 && num_read > 100,
        "opened {num_opened}, read {num_read}"
    );
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 file
// ---------------------------------------------------------------------------------------------

#[test]
fn smollm2_gguf_matches_python_gguf_reference() {
    let path = smollm2_gguf();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.get_u64("llama.block_count").unwrap(), Some(30));
    assert_eq!(file.get_u64("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(file.get_u64("llama.attention.head_count").unwrap(), Some(9));
    assert_eq!(
        file.get_u64("llama.attention.head_count_kv").unwrap(),
        Some(3)
    );
    assert_eq!(
        file.get_f32("llama.rope.freq_base").unwrap(),
        Some(100000.0)
    );
    assert_eq!(
        file.get_f32("llama.attention.layer_norm_rms_epsilon")
            .unwrap(),
        Some(1e-5)
    );
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        49152
    );
    assert_eq!(file.tensor_infos().len(), 272);

    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2_gguf_reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(fixture["num_tensors"], 272);
    for t in fixture["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let info = file.tensor_info(name).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        assert_eq!(info.ggml_type.name(), t["type"].as_str(), "{name}");
        let tensor = file.get(name, Shard::Replicated).unwrap();
        assert_eq!(tensor.shape, shape, "{name}");
        // The fixture samples rows of 2-D tensors and the whole of 1-D ones.
        let row_len: usize = if shape.len() == 2 {
            shape[1]
        } else {
            shape.iter().product()
        };
        for sample in t["samples"].as_array().unwrap() {
            let row = sample["row"].as_u64().unwrap() as usize;
            let data = &tensor.data[row * row_len..(row + 1) * row_len];
            let first: Vec<f32> = sample["first"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let last: Vec<f32> = sample["last"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_bits_eq(
                &data[..first.len()],
                &first,
                &format!("{name} row {row} first"),
            );
            assert_bits_eq(
                &data[row_len - last.len()..],
                &last,
                &format!("{name} row {row} last"),
            );
        }
        let sum: f64 = tensor.data.iter().map(|&v| f64::from(v)).sum();
        let abs_sum: f64 = tensor.data.iter().map(|&v| f64::from(v).abs()).sum();
        let (want_sum, want_abs) = (t["sum"].as_f64().unwrap(), t["abs_sum"].as_f64().unwrap());
        assert!(
            (sum - want_sum).abs() <= 1e-9 * want_abs.max(1.0),
            "{name}: sum {sum} vs {want_sum}"
        );
        assert!(
            (abs_sum - want_abs).abs() <= 1e-9 * want_abs.max(1.0),
            "{name}: {abs_sum} vs {want_abs}"
        );

        // Quantized projections convert exactly to the compact format.
        if let Some(q8) = file.get_q8(name, Shard::Replicated).unwrap() {
            let from_q8 = dequant_q8(&q8.blocks);
            assert!(
                from_q8.iter().zip(&tensor.data).all(|(a, b)| a == b),
                "{name}: q8 differs"
            );
        }
    }
    // Every tensor reads, with its shape and finite values.
    let mut num_params = 0;
    for name in file.names() {
        let t = file.get(&name, Shard::Replicated).unwrap();
        assert_eq!(t.data.len(), t.numel(), "{name}");
        assert!(t.data.iter().all(|v| v.is_finite()), "{name}");
        num_params += t.numel();
    }
    assert_eq!(num_params, 134_515_008); // as counted by gguf-py
    assert_eq!(
        file.info("token_embd.weight").unwrap().shape,
        vec![49152, 576]
    );
    assert!(
        file.get_q8("blk.0.ffn_down.weight", Shard::Replicated)
            .unwrap()
            .is_some()
    );
    assert!(
        file.get_q8("blk.0.attn_norm.weight", Shard::Replicated)
            .unwrap()
            .is_none()
    );
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Random blocks of every type dequantized by Python's `gguf` package
/// (scripts/make_quant_blocks_fixture.py): an independent check of the block layouts.
#[test]
fn dequantize_matches_python_gguf_on_random_blocks() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/gguf_quant_blocks.json")).unwrap();
    let mut num_types = 0;
    for t in fixture["types"].as_array().unwrap() {
        let ty = GgmlType(t["id"].as_u64().unwrap() as u32);
        assert_eq!(ty.name(), t["type"].as_str());
        let bytes = hex(t["bytes"].as_str().unwrap());
        let expected: Vec<f32> = hex(t["values_f32le"].as_str().unwrap())
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut out = vec![0.0; expected.len()];
        dequantize(ty, &bytes, &mut out).unwrap();
        assert_bits_eq(&out, &expected, &format!("{ty} vs gguf-py"));
        num_types += 1;
    }
    assert_eq!(num_types, GgmlType::DEQUANTIZABLE.len() - 1); // all but Q8_K
}
