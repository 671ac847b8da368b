//! Damaged GGUF files (issue 19, item 5): each is a tiny fixture model (tests/fixtures/models)
//! with a few header bytes changed, and each must be refused with a sentence, never a panic,
//! a wrapped sum or a read of a neighbour's bytes.

use std::path::PathBuf;
use std::sync::Arc;

use longctx::gguf::Gguf;
use longctx::session::Model;
use longctx::Result;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    std::fs::read(path).unwrap()
}

/// The position just past the first GGUF string `s` (a u64 length, then its bytes).
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("`{s}` is not in the fixture"));
    at + needle.len()
}

/// Where a metadata value starts (past its key and its u32 type).
fn value_at(bytes: &[u8], key: &str) -> usize {
    after_string(bytes, key) + 4
}

/// Positions of a tensor record's fields in the header.
struct TensorRecord {
    dims: usize,
    dtype: usize,
    offset: usize,
}

fn tensor_record(bytes: &[u8], name: &str) -> TensorRecord {
    let at = after_string(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let dtype = at + 4 + 8 * n_dims;
    TensorRecord {
        dims: at + 4,
        dtype,
        offset: dtype + 4,
    }
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

fn with_file<T>(bytes: &[u8], f: impl FnOnce(&std::path::Path) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    f(&path)
}

fn open(bytes: &[u8]) -> Result<Gguf> {
    with_file(bytes, Gguf::open)
}

fn load(bytes: &[u8]) -> Result<Arc<Model>> {
    with_file(bytes, Model::load)
}

fn refused<T>(result: Result<T>, expected: &str) -> String {
    let message = match result {
        Ok(_) => panic!("the damaged file was accepted; expected an error naming `{expected}`"),
        Err(e) => e.to_string(),
    };
    assert!(message.contains(expected), "{message}");
    message
}

/// Turns `general.file_type` (a u32 with a key of the same length) into `general.alignment`.
fn with_alignment(alignment: u32) -> Vec<u8> {
    let mut bytes = fixture("llama-q8_0.gguf");
    let key = after_string(&bytes, "general.file_type") - "general.file_type".len();
    put(&mut bytes, key, b"general.alignment");
    put(&mut bytes, key + 17 + 4, &alignment.to_le_bytes());
    bytes
}

fn fixture_names() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    names.sort();
    names
}

#[test]
fn every_fixture_opens_and_loads() {
    for name in fixture_names() {
        load(&fixture(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The fixture's own alignment, written explicitly, is accepted.
    load(&with_alignment(32)).unwrap();
}

#[test]
fn a_header_cut_short_is_reported_as_truncated() {
    let bytes = fixture("llama-q8_0.gguf");
    // Inside the vocabulary: its array declares more strings than the bytes left could hold.
    let cut = after_string(&bytes, "tokenizer.ggml.tokens") + 100;
    refused(open(&bytes[..cut]), "is truncated");
    refused(open(&bytes[..100]), "is truncated");
}

#[test]
fn a_count_no_file_could_hold_is_refused_as_damage() {
    let mut bytes = fixture("llama-q8_0.gguf");
    put(&mut bytes, 8, &u64::MAX.to_le_bytes());
    refused(open(&bytes), "is damaged: the tensor count");
}

#[test]
fn a_zero_alignment_is_refused() {
    let message = refused(open(&with_alignment(0)), "general.alignment");
    assert!(message.contains("power of two"), "{message}");
}

#[test]
fn an_alignment_that_is_not_a_power_of_two_is_refused() {
    refused(open(&with_alignment(48)), "power of two");
}

#[test]
fn an_alignment_that_is_not_a_u32_is_refused() {
    let mut bytes = with_alignment(32);
    // Type 4 (u32) to 5 (i32): same width, wrong type.
    let at = value_at(&bytes, "general.alignment") - 4;
    put(&mut bytes, at, &5u32.to_le_bytes());
    refused(open(&bytes), "general.alignment");
}

#[test]
fn a_tensor_offset_near_the_end_of_u64_is_refused() {
    for offset in [u64::MAX, u64::MAX - 31, 1 << 63] {
        let mut bytes = fixture("llama-q8_0.gguf");
        let record = tensor_record(&bytes, "token_embd.weight");
        put(&mut bytes, record.offset, &offset.to_le_bytes());
        refused(open(&bytes), "token_embd.weight");
    }
}

#[test]
fn a_tensor_offset_off_the_alignment_is_refused() {
    let mut bytes = fixture("llama-q8_0.gguf");
    let record = tensor_record(&bytes, "blk.0.attn_norm.weight");
    let offset = u64::from_le_bytes(bytes[record.offset..record.offset + 8].try_into().unwrap());
    put(&mut bytes, record.offset, &(offset + 2).to_le_bytes());
    refused(open(&bytes), "blk.0.attn_norm.weight");
}

#[test]
fn a_tensor_retyped_to_f32_overlapping_its_neighbour_is_refused() {
    let mut bytes = fixture("llama-q8_0.gguf");
    let record = tensor_record(&bytes, "token_embd.weight");
    put(&mut bytes, record.dtype, &0u32.to_le_bytes());
    let message = refused(open(&bytes), "token_embd.weight");
    assert!(message.contains("overlaps"), "{message}");
}

#[test]
fn a_tensor_with_overflowing_dims_is_refused() {
    let mut bytes = fixture("llama-q8_0.gguf");
    let record = tensor_record(&bytes, "token_embd.weight");
    put(&mut bytes, record.dims, &(1u64 << 40).to_le_bytes());
    put(&mut bytes, record.dims + 8, &(1u64 << 40).to_le_bytes());
    refused(open(&bytes), "token_embd.weight");
}

#[test]
fn a_row_that_is_not_whole_blocks_is_refused() {
    let mut bytes = fixture("llama-q8_0.gguf");
    let record = tensor_record(&bytes, "token_embd.weight");
    // 250 x 320 values make whole Q8_0 blocks in total, but each row ends inside a block.
    put(&mut bytes, record.dims, &250u64.to_le_bytes());
    refused(open(&bytes), "token_embd.weight");
}

#[test]
fn a_model_with_no_layers_is_refused() {
    let mut bytes = fixture("llama-q8_0.gguf");
    let at = value_at(&bytes, "llama.block_count");
    put(&mut bytes, at, &0u32.to_le_bytes());
    refused(load(&bytes), "llama.block_count");
}

#[test]
fn a_model_with_more_layers_than_tensors_is_refused() {
    let mut bytes = fixture("gemma3-q5_0.gguf");
    let at = value_at(&bytes, "gemma3.block_count");
    put(&mut bytes, at, &u32::MAX.to_le_bytes());
    refused(load(&bytes), "gemma3.block_count");
}

#[test]
fn a_missing_tensor_is_refused_by_name() {
    let mut bytes = fixture("llama-q8_0.gguf");
    let at = after_string(&bytes, "blk.1.ffn_up.weight") - 2;
    // Renamed to a name the loader does not look for.
    put(&mut bytes, at, b"xx");
    refused(load(&bytes), "blk.1.ffn_up.weight");
}
