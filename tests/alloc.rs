//! The capture hot loop makes no heap allocation: a counting global allocator, armed only on this
//! thread while `Source::read_period` runs (the exact body of the capture thread's loop), for ALSA
//! capture through the real `file` plugin and for a 48 kHz stereo WAV that is mixed and resampled.
//! Compressed files: FLAC, MP3 and Ogg/Opus only what their demuxers and decoders make per page
//! or packet (symphonia, the ogg crate).
//!
//! A test binary of its own (Cargo.toml), not a module of tests/integration.rs: it sets
//! `ALSA_CONFIG_PATH` for the whole process, sound only while no other thread reads the
//! environment, and every process other tests started afterwards would inherit it. The counting
//! allocator alone would be harmless there, since it counts only on the thread that arms it.

// The 80-line limit is for src/: a test or a bench is one scenario, read from top to bottom.
#![allow(clippy::too_many_lines)]
// A counting global allocator is unsafe code by definition, and so is setting the environment.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hark::capture::alsa::AlsaSource;
use hark::capture::file::{FileSource, open_input};
use hark::capture::{self, Chunk, Flow, RingState, Source};
use hark::config::ChannelSel;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if ARMED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Run `periods` periods of `source` with the counter armed; returns the allocations, the samples
/// that reached the ring and the samples lost to overruns.
fn count(source: &mut dyn Source, periods: usize, ring_samples: usize) -> (u64, u64, u64) {
    let shared = Arc::new(RingState::default());
    let (mut writer, mut reader) = capture::ring(ring_samples, shared.clone());
    let mut out = vec![0i16; ring_samples];
    let mut samples = 0u64;
    // One unarmed period first, as the thread does after opening.
    source.read_period(&mut writer).expect("first period");
    ALLOCATIONS.store(0, Ordering::Relaxed);
    for i in 0..periods {
        ARMED.with(|a| a.set(true));
        let flow = source.read_period(&mut writer);
        ARMED.with(|a| a.set(false));
        assert!(matches!(flow, Ok(Flow::Continue)), "{flow:?}");
        // Drain every fourth period only (unarmed): a small ring overruns in between, so marking
        // and publishing gaps is part of what is measured.
        if i % 4 == 3 {
            loop {
                match reader.read(&mut out) {
                    Chunk::Samples(n) => samples += n as u64,
                    Chunk::Gap(_) => {}
                    Chunk::Empty => break,
                }
            }
        }
    }
    let lost = shared.lost_samples.load(Ordering::Relaxed);
    (ALLOCATIONS.load(Ordering::Relaxed), samples, lost)
}

#[test]
fn capture_periods_do_not_allocate() {
    // The counter itself works: an armed allocation is seen.
    ALLOCATIONS.store(0, Ordering::Relaxed);
    ARMED.with(|a| a.set(true));
    let probe = std::hint::black_box(vec![1u8; 64]);
    ARMED.with(|a| a.set(false));
    drop(probe);
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 1);

    let dir = tempfile::tempdir().unwrap();

    // ALSA through the file plugin, 48 kHz stereo mixed to mono and resampled, with a ring so small
    // that overruns (gap marking) happen too.
    let raw = dir.path().join("tone.raw");
    let tone: Vec<i16> = (0..48_000 * 2)
        .map(|i| ((i / 2) as f32 * 0.05).sin() as i16 * 1000)
        .collect();
    common::write_raw(&raw, &tone);
    let conf = common::alsa_config(dir.path(), &raw);
    // SAFETY: set before any other thread of this test binary reads the environment.
    unsafe { std::env::set_var("ALSA_CONFIG_PATH", &conf) };
    let mut alsa = AlsaSource::new("hark_test", 48_000, 2, ChannelSel::Mix, 20);
    alsa.open().expect("open the file-plugin PCM");
    let (allocs, samples, lost) = count(&mut alsa, 300, 1_000);
    assert!(samples > 16_000, "captured {samples}");
    assert!(lost > 0, "the ring was meant to overrun");
    assert_eq!(
        allocs, 0,
        "ALSA capture allocated {allocs} times in 300 periods"
    );

    // A 48 kHz stereo WAV file, channel 1, resampled.
    let wav = dir.path().join("stereo.wav");
    common::write_wav(&wav, &tone[..48_000 * 2], 48_000, 2);
    let mut file = FileSource::open_path(&wav, ChannelSel::Index(1), false).expect("open wav");
    let (allocs, samples, _) = count(&mut file, 40, 100_000);
    assert!(samples > 8_000, "read {samples}");
    assert_eq!(
        allocs, 0,
        "file capture allocated {allocs} times in 40 periods"
    );

    // The same tone as Ogg/Opus (hark's writer, 16 kHz mono, 6 s in pages of 1 s), decoded as it
    // is read: the ogg crate allocates when a page is read (its lacing, body and packet table, 3
    // allocations, and a copy of each of its 50 packets); decoding the packets, one a period,
    // allocates nothing. 200 periods (4 s) read 4 pages, at most 5.
    let settings = hark::codec::EncodeSettings {
        bitrate: 24_000,
        complexity: 5,
    };
    let mut w = hark::codec::OggOpusWriter::new(Vec::new(), &settings, "t", &[], 1).unwrap();
    w.write(&tone).unwrap();
    let ogg = dir.path().join("tone.opus");
    std::fs::write(&ogg, w.finish().unwrap().0).unwrap();
    let mut opus = open_input(&ogg, ChannelSel::Mix, false).expect("open ogg");
    let (allocs, samples, _) = count(opus.as_mut(), 200, 100_000);
    assert!(samples > 60_000, "read {samples}");
    let pages = 200 / 50 + 1;
    assert!(
        allocs <= pages * (3 + 50),
        "Ogg/Opus allocated {allocs} times in 200 periods ({pages} pages)"
    );

    // FLAC and MP3 (3 s at 48 kHz stereo, channel 1, resampled): symphonia's demuxers allocate
    // each packet's buffer (MP3: one per packet; FLAC: in 1 KB fragments, measured 2-3 per
    // packet), and its MP3 decoder builds its tables on first use; hark's part adds nothing. A
    // first run of periods warms up, the second is measured.
    common::require("sox", "sox");
    common::require("lame", "lame");
    let sine: Vec<i16> = (0..48_000 * 3)
        .flat_map(|i| {
            let s = ((i as f32 * 0.05).sin() * 8000.0) as i16;
            [s / 2, s]
        })
        .collect();
    let long = dir.path().join("long.wav");
    common::write_wav(&long, &sine, 48_000, 2);
    let flac = dir.path().join("long.flac");
    let mp3 = dir.path().join("long.mp3");
    assert!(
        Command::new("sox")
            .arg(&long)
            .arg(&flac)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("lame")
            .arg("--quiet")
            .arg(&long)
            .arg(&mp3)
            .status()
            .unwrap()
            .success()
    );
    for (path, packet_frames) in [(&flac, 4096), (&mp3, 1152)] {
        let mut media = open_input(path, ChannelSel::Index(1), false).expect("open");
        count(media.as_mut(), 40, 100_000);
        let (allocs, samples, _) = count(media.as_mut(), 40, 100_000);
        assert!(samples > 8_000, "read {samples}");
        // Packets begun in 40 periods of 960 frames, and one in progress; at most 4 allocations
        // each.
        let packets = 40 * 960 / packet_frames + 2;
        assert!(
            allocs <= 4 * packets,
            "{} allocated {allocs} times in 40 periods ({packets} packets)",
            path.display()
        );
    }
}
