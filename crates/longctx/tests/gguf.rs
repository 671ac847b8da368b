//! Damaged GGUF files (issue 19, item 5): each is a tiny fixture model (tests/fixtures/models)
//! with a few header bytes changed, and each must be refused with a sentence, never a panic,
//! a wrapped sum or a read of a neighbour's bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use longctx::fetch::FetchConfig;
use longctx::gguf::{Gguf, MetaValue};
use longctx::session::Model;
use longctx::Result;
use proptest::prelude::*;
use proptest::sample::Index;

/// Records the largest single allocation asked for: a count or length read from a damaged
/// file must not size an allocation past what the file could hold.
struct PeakAllocator;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: PeakAllocator = PeakAllocator;

/// Far above any fixture (5 MB at most) and what loading one needs, far below what a length
/// from a damaged header could ask for.
const ALLOCATION_LIMIT: usize = 256 << 20;

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

/// A fixture as the fuzzer mutates it: where its header ends and where the fields a damaged
/// file is most likely to get wrong lie, so most mutations land where the reader looks.
struct Target {
    name: String,
    bytes: Vec<u8>,
    header_len: usize,
    /// Tensor records: (dtype, offset, first dim, number of dims) positions.
    tensors: Vec<(usize, usize, usize, usize)>,
    /// Integer metadata values: (position, width in bytes).
    numbers: Vec<(usize, usize)>,
}

impl Target {
    fn new(name: &str, bytes: Vec<u8>) -> Self {
        let g = open(&bytes).unwrap();
        let data: usize = g
            .tensor_names()
            .map(|t| g.tensor(t).unwrap().bytes.len())
            .sum();
        let tensors = g
            .tensor_names()
            .map(|t| {
                let r = tensor_record(&bytes, t);
                (r.dtype, r.offset, r.dims, (r.dtype - r.dims) / 8)
            })
            .collect();
        let numbers = g
            .metadata()
            .iter()
            .filter_map(|(key, value)| {
                let width = match value {
                    MetaValue::U8(_) | MetaValue::I8(_) => 1,
                    MetaValue::U16(_) | MetaValue::I16(_) => 2,
                    MetaValue::U32(_) | MetaValue::I32(_) => 4,
                    MetaValue::U64(_) | MetaValue::I64(_) => 8,
                    _ => return None,
                };
                Some((value_at(&bytes, key), width))
            })
            .collect();
        Self {
            name: name.to_string(),
            header_len: bytes.len() - data,
            bytes,
            tensors,
            numbers,
        }
    }
}

fn targets() -> &'static [Target] {
    static TARGETS: OnceLock<Vec<Target>> = OnceLock::new();
    TARGETS.get_or_init(|| {
        fixture_names()
            .iter()
            .map(|name| Target::new(name, fixture(name)))
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: Index,
        bit: u8,
    },
    /// A little-endian word of 1 to 8 bytes anywhere in the header.
    Word {
        at: Index,
        width: u8,
        value: u64,
    },
    /// A tensor record's type (field 0), offset (1) or a dimension (2 and up).
    TensorField {
        tensor: Index,
        field: u8,
        value: u64,
    },
    /// An integer metadata value, such as a layer or head count.
    Number {
        key: Index,
        value: u64,
    },
    Truncate {
        at: Index,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: Index,
        len: usize,
    },
}

fn extreme() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 31),
        Just(1 << 63),
        Just(u64::from(u32::MAX)),
        Just(1 << 32),
        0u64..64,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<Index>(), 1u8..=8, extreme()).prop_map(|(at, width, value)| Mutation::Word {
            at,
            width,
            value
        }),
        (any::<Index>(), 0u8..6, extreme()).prop_map(|(tensor, field, value)| {
            Mutation::TensorField {
                tensor,
                field,
                value,
            }
        }),
        (any::<Index>(), extreme()).prop_map(|(key, value)| Mutation::Number { key, value }),
        any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn put_word(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    let width = width.min(bytes.len() - at);
    put(bytes, at, &value.to_le_bytes()[..width]);
}

fn mutate(target: &Target, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = target.bytes.clone();
    for m in mutations {
        // Earlier mutations may have cut the file or moved the header's end.
        let header = target.header_len.min(bytes.len());
        if header == 0 {
            break;
        }
        match m {
            Mutation::FlipBit { at, bit } => bytes[at.index(header)] ^= 1 << bit,
            Mutation::Word { at, width, value } => {
                put_word(&mut bytes, at.index(header), *width as usize, *value)
            }
            Mutation::TensorField {
                tensor,
                field,
                value,
            } => {
                let (dtype, offset, dims, n_dims) =
                    target.tensors[tensor.index(target.tensors.len())];
                let (at, width) = match field {
                    0 => (dtype, 4),
                    1 => (offset, 8),
                    k => (dims + 8 * ((*k as usize - 2) % n_dims.max(1)), 8),
                };
                if at < bytes.len() {
                    put_word(&mut bytes, at, width, *value);
                }
            }
            Mutation::Number { key, value } => {
                let (at, width) = target.numbers[key.index(target.numbers.len())];
                if at < bytes.len() {
                    put_word(&mut bytes, at, width, *value);
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(bytes.len())),
            Mutation::Insert { at, bytes: new } => {
                let at = at.index(header);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Remove { at, len } => {
                let at = at.index(header);
                let end = (at + len).min(bytes.len());
                bytes.drain(at..end);
            }
        }
    }
    bytes
}

/// `LONGCTX_FUZZ_CASES` raises the count for a long run (scripts/fuzz_gguf.sh).
fn fuzz_cases(short: u32) -> u32 {
    std::env::var("LONGCTX_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(short)
}

/// Runs one case and checks its largest allocation; the count restarts so that shrinking sees
/// each case's own.
fn with_bounded_allocations<T>(case: impl FnOnce() -> T) -> T {
    LARGEST_ALLOCATION.store(0, Ordering::Relaxed);
    let out = case();
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_LIMIT,
        "an allocation of {largest} bytes was asked for"
    );
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz_cases(256),
        ..ProptestConfig::default()
    })]

    /// Any damage to a fixture's header is either harmless or refused with an error: the reader
    /// and the model loader never panic and never allocate by a damaged length.
    #[test]
    fn fuzz_damaged_fixtures_load_or_are_refused(
        fixture in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let target = &targets()[fixture.index(targets().len())];
        let bytes = mutate(target, &mutations);
        if let Err(e) = with_bounded_allocations(|| load(&bytes)) {
            prop_assert!(!e.to_string().is_empty(), "{}: an empty message", target.name);
        }
    }
}

/// The default model's header, when it is downloaded: its tokenizer metadata is far larger and
/// more varied than the fixtures'. Only the header travels (the tensors would be 100 MB a case),
/// so the reader ends each case refusing the missing tensor data, if nothing earlier.
fn real_header() -> Option<&'static Vec<u8>> {
    static HEADER: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    HEADER
        .get_or_init(|| {
            let path = FetchConfig::from_env()
                .home
                .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
            let g = Gguf::open(&path).ok()?;
            let data: usize = g
                .tensor_names()
                .map(|t| g.tensor(t).unwrap().bytes.len())
                .sum();
            let bytes = std::fs::read(&path).ok()?;
            Some(bytes[..bytes.len() - data].to_vec())
        })
        .as_ref()
}

/// Mutations of the real header land in its first 64 KiB, where the counts, the
/// hyper-parameters and the start of the vocabulary lie.
const REAL_HEADER_SPAN: usize = 64 << 10;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz_cases(256) / 8,
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_damaged_real_header_is_refused(
        words in prop::collection::vec((any::<Index>(), extreme(), 1u8..=8), 1..4),
    ) {
        let Some(header) = real_header() else {
            return Ok(());
        };
        let mut bytes = header.clone();
        let span = REAL_HEADER_SPAN.min(bytes.len());
        for (at, value, width) in &words {
            put_word(&mut bytes, at.index(span), *width as usize, *value);
        }
        let opened = with_bounded_allocations(|| open(&bytes));
        prop_assert!(opened.is_err(), "the header alone has no tensor data");
    }
}
