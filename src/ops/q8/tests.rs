//! Every instruction set against the scalar path, bit for bit, on ragged shapes; batch invariance.

use super::*;
use crate::ops::quant::tests::random_values;

/// Random blocks mixing the weight formats: Q4_1-like (unsigned 4-bit values, negative min),
/// Q8_0-like (full i8 range including -128 and 127) and symmetric requantized ones.
fn random_weight(seed: u64, rows: usize, nb: usize) -> Q8Tensor {
    let num_blocks = rows * nb;
    let vals = random_values(seed, num_blocks * (QK + 2));
    let blocks = (0..num_blocks)
        .map(|b| {
            let mut qs = [0i8; QK];
            for (i, q) in qs.iter_mut().enumerate() {
                let r = vals[b * QK + i];
                *q = match b % 3 {
                    0 => ((r + 1.0) * 7.99) as i8,
                    1 if i == 5 => -128,
                    1 if i == 6 => 127,
                    _ => (r * 127.0) as i8,
                };
            }
            let scale = 0.002 + vals[num_blocks * QK + b].abs() * 0.02;
            let min = if b % 3 == 0 {
                -8.0 * scale + 0.1 * vals[num_blocks * (QK + 1) + b]
            } else {
                0.0
            };
            BlockQ8 { scale, min, qs }
        })
        .collect();
    Q8Tensor {
        rows,
        cols: nb * QK,
        blocks,
    }
}

fn run(x: &[f32], m: usize, t: &Q8Tensor, bias: Option<&[f32]>, isa: Isa) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * t.rows];
    matmul(x, m, t, bias, &mut y, isa);
    y
}

/// The SIMD variants this CPU runs; prints the ones it skips.
fn supported_simd() -> Vec<Isa> {
    Isa::ALL[1..]
        .iter()
        .copied()
        .filter(|isa| {
            let ok = isa.is_supported();
            if !ok {
                println!("skipping {isa:?}: this CPU lacks the instructions");
            }
            ok
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn every_isa_matches_scalar_bit_for_bit_on_ragged_shapes() {
    let isas = supported_simd();
    let mut seed = 1000;
    for (rows, nb) in [(1, 1), (15, 3), (16, 2), (17, 5), (37, 1), (70, 18)] {
        let t = random_weight(seed, rows, nb);
        let bias = random_values(seed + 1, rows);
        for m in 1..=33 {
            seed += 2;
            let mut x = random_values(seed, m * nb * QK);
            // An all-zero block (scale 0) and a large-magnitude row.
            x[..QK].fill(0.0);
            if m > 2 {
                for v in &mut x[2 * nb * QK..3 * nb * QK] {
                    *v *= 300.0;
                }
            }
            let with_bias = (m % 2 == 1).then_some(bias.as_slice());
            let reference = run(&x, m, &t, with_bias, Isa::Scalar);
            assert!(reference.iter().all(|v| v.is_finite()));
            for &isa in &isas {
                let y = run(&x, m, &t, with_bias, isa);
                assert_eq!(
                    bits(&y),
                    bits(&reference),
                    "{isa:?} rows={rows} nb={nb} m={m}: {:?} vs {:?}",
                    &y[..rows.min(4)],
                    &reference[..rows.min(4)]
                );
            }
        }
    }
}

/// A row's outputs are the same alone as in any batch, on every instruction set (the engine's
/// batch invariance rests on this).
#[test]
fn outputs_do_not_depend_on_the_batch() {
    let (rows, nb, m) = (45, 7, 21);
    let t = random_weight(7, rows, nb);
    let bias = random_values(8, rows);
    let x = random_values(9, m * nb * QK);
    let cols = nb * QK;
    for isa in Isa::ALL.into_iter().filter(|isa| isa.is_supported()) {
        let batched = run(&x, m, &t, Some(&bias), isa);
        for i in 0..m {
            let alone = run(&x[i * cols..(i + 1) * cols], 1, &t, Some(&bias), isa);
            assert_eq!(
                bits(&alone),
                bits(&batched[i * rows..(i + 1) * rows]),
                "{isa:?} row {i}"
            );
        }
    }
}

#[test]
fn simd_packing_matches_portable_packing() {
    let Some(isa) = Isa::Avx512Vnni.checked() else {
        println!("skipping: this CPU lacks AVX-512 VNNI");
        return;
    };
    let nb = 5;
    let t = random_weight(11, GROUP, nb);
    let rows: [&[BlockQ8]; GROUP] = std::array::from_fn(|r| &t.blocks[r * nb..(r + 1) * nb]);
    let mut portable = vec![PackedBlock::ZERO; nb];
    let mut simd = vec![PackedBlock::ZERO; nb];
    pack_scalar(&rows, &mut portable);
    pack(isa, &rows, &t.blocks, &mut simd);
    for (b, (p, s)) in portable.iter().zip(&simd).enumerate() {
        assert_eq!(p.qs, s.qs, "block {b}");
        assert_eq!(p.neg_corr, s.neg_corr, "block {b}");
        assert_eq!(bits(&p.scale), bits(&s.scale), "block {b}");
        assert_eq!(bits(&p.min), bits(&s.min), "block {b}");
    }
    // Spot-check the layout itself: lane r of word j is row r's bytes 4j..4j+4.
    let (r, b, j) = (13, 3, 6);
    assert_eq!(
        portable[b].qs[j][4 * r..4 * r + 4],
        t.blocks[r * nb + b].qs[4 * j..4 * j + 4]
    );
}

#[test]
fn detect_picks_a_supported_isa() {
    let isa = Isa::detect();
    assert!(isa.is_supported());
    println!("detected {isa:?}");
    assert!(Isa::Scalar.is_supported());
}
