//! Minimal Ogg page muxer (RFC 3533) for writing a single logical stream,
//! and the page header layout that hark's Ogg reader shares with it.
//!
//! [`OggPageWriter`] packs packets into pages (lacing values, continued
//! packets, BOS/EOS flags, sequence numbers, CRC-32) and writes each finished
//! page straight to the underlying writer. The page buffers are allocated
//! once in [`OggPageWriter::new`], so steady-state writing does not allocate:
//! it runs on the capture path, once per 20 ms packet of every utterance.
//!
//! Why hark writes pages itself rather than with the `ogg` crate's
//! `PacketWriter` (0.9; [`decode`](super::decode) uses the crate's reading
//! half): `PacketWriter` allocates on the capture path. Each `write_packet`
//! builds a new per-stream state, a 255-entry `Vec` included, before finding
//! the existing one, and each page's header is a fresh `Vec`: 510 allocations
//! for 500 packets in 10 pages, measured with a counting allocator. And it
//! keeps the packets of the page being built as `Cow<'writer, [u8]>` until the
//! page is written, so the encoder's reused packet buffer could only be handed
//! over as an owned copy: 1010 allocations for the same 500 packets. Its pages
//! would otherwise do (a page can be ended after any packet, the granule
//! position is the last finished packet's, EOS is set by the last packet).
//!
//! It deliberately does not: read or demux Ogg (that is the `ogg` crate's
//! job, in [`decode`](super::decode); `PageHeader` only names the fields
//! the reader checks), interleave several logical streams, or know anything
//! about the codec inside (granule positions are whatever the caller passes).

use std::io::{self, Write};

/// Most lacing values (segments) one page can hold.
const MAX_SEGMENTS: usize = 255;
/// Fixed part of the page header, before the lacing values.
pub(crate) const HEADER_LEN: usize = 27;
/// Where the fields of the page header are (RFC 3533, section 6): the capture
/// pattern `OggS` and the version (0) come first, then these.
const FLAGS_AT: usize = 5;
const GRANULE_AT: usize = 6;
const SERIAL_AT: usize = 14;
const SEQUENCE_AT: usize = 18;
/// Offset of the CRC field within the page header.
const CRC_OFFSET: usize = 22;
const SEGMENTS_AT: usize = 26;

/// Header type flags.
pub(crate) const FLAG_CONTINUED: u8 = 0x01;
pub(crate) const FLAG_BOS: u8 = 0x02;
pub(crate) const FLAG_EOS: u8 = 0x04;

/// Granule position of a page on which no packet completes (-1).
pub(crate) const NO_GRANULE: u64 = u64::MAX;

/// The fields of a page header that a reader checks itself. The capture
/// pattern, version, lacing values and CRC are the `ogg` crate's to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageHeader {
    /// Header type flags ([`FLAG_CONTINUED`], [`FLAG_BOS`], [`FLAG_EOS`]).
    pub(crate) flags: u8,
    /// Granule position; [`NO_GRANULE`] if no packet ends on the page.
    pub(crate) granule: u64,
    pub(crate) serial: u32,
    pub(crate) sequence: u32,
}

impl PageHeader {
    /// Reads the fields out of the first [`HEADER_LEN`] bytes of a page.
    pub(crate) fn parse(h: &[u8; HEADER_LEN]) -> Self {
        let mut granule = [0; 8];
        granule.copy_from_slice(&h[GRANULE_AT..GRANULE_AT + 8]);
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        Self {
            flags: h[FLAGS_AT],
            granule: u64::from_le_bytes(granule),
            serial: u32_at(SERIAL_AT),
            sequence: u32_at(SEQUENCE_AT),
        }
    }
}

/// CRC lookup table for the Ogg CRC-32 (poly 0x04c11db7, init 0, unreflected).
const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
            bit += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
}

/// Continues an Ogg CRC-32 over `data` (start with `crc = 0`).
pub(crate) fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = (crc << 8) ^ CRC_TABLE[usize::from((crc >> 24) as u8 ^ b)];
    }
    crc
}

/// Writes one logical Ogg stream, page by page, to `W`.
pub(crate) struct OggPageWriter<W: Write> {
    out: W,
    serial: u32,
    sequence: u32,
    /// Page header followed by the lacing values of the page being built.
    header: [u8; HEADER_LEN + MAX_SEGMENTS],
    segments: usize,
    /// Packet data of the page being built (capacity for a full page).
    body: Vec<u8>,
    /// Granule of the last packet completed on the current page.
    granule: u64,
    /// The current page starts with the rest of a packet from the previous one.
    continued: bool,
    /// No page has been written yet (the next one gets BOS).
    first: bool,
}

impl<W: Write> OggPageWriter<W> {
    /// Starts a logical stream with the given serial number.
    pub(crate) fn new(out: W, serial: u32) -> Self {
        Self {
            out,
            serial,
            sequence: 0,
            header: [0; HEADER_LEN + MAX_SEGMENTS],
            segments: 0,
            body: Vec::with_capacity(MAX_SEGMENTS * 255),
            granule: NO_GRANULE,
            continued: false,
            first: true,
        }
    }

    /// Appends `packet`, whose end has granule position `granule`, to the
    /// current page; pages that fill up on the way are written out. With
    /// `end_page` the page is written after this packet and `W` is flushed.
    pub(crate) fn write_packet(
        &mut self,
        packet: &[u8],
        granule: u64,
        end_page: bool,
    ) -> io::Result<()> {
        self.append(packet, granule)?;
        if end_page {
            self.flush_page(0)?;
            self.out.flush()?;
        }
        Ok(())
    }

    /// Writes `last_packet` as the final packet of the stream, with the EOS
    /// flag on its (last) page, flushes `W` and returns it.
    pub(crate) fn finish(mut self, last_packet: &[u8], granule: u64) -> io::Result<W> {
        self.append(last_packet, granule)?;
        self.flush_page(FLAG_EOS)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn append(&mut self, packet: &[u8], granule: u64) -> io::Result<()> {
        let mut rest = packet;
        loop {
            if self.segments == MAX_SEGMENTS {
                self.flush_page(0)?;
            }
            let len = rest.len().min(255);
            self.header[HEADER_LEN + self.segments] = len as u8;
            self.segments += 1;
            self.body.extend_from_slice(&rest[..len]);
            rest = &rest[len..];
            if len < 255 {
                break;
            }
        }
        self.granule = granule;
        Ok(())
    }

    /// Writes the current page (if it holds any segment) with `flags` added.
    fn flush_page(&mut self, flags: u8) -> io::Result<()> {
        if self.segments == 0 {
            return Ok(());
        }
        let mut header_type = flags;
        if self.continued {
            header_type |= FLAG_CONTINUED;
        }
        if self.first {
            header_type |= FLAG_BOS;
        }
        let h = &mut self.header;
        h[..4].copy_from_slice(b"OggS");
        h[4] = 0;
        h[FLAGS_AT] = header_type;
        h[GRANULE_AT..GRANULE_AT + 8].copy_from_slice(&self.granule.to_le_bytes());
        h[SERIAL_AT..SERIAL_AT + 4].copy_from_slice(&self.serial.to_le_bytes());
        h[SEQUENCE_AT..SEQUENCE_AT + 4].copy_from_slice(&self.sequence.to_le_bytes());
        h[CRC_OFFSET..CRC_OFFSET + 4].fill(0);
        h[SEGMENTS_AT] = self.segments as u8;
        let header = &mut h[..HEADER_LEN + self.segments];
        let crc = crc32_update(crc32_update(0, header), &self.body);
        header[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(header)?;
        self.out.write_all(&self.body)?;

        // A last lacing value of 255 means the packet goes on in the next page.
        self.continued = header[HEADER_LEN + self.segments - 1] == 255;
        self.first = false;
        self.sequence = self.sequence.wrapping_add(1);
        self.segments = 0;
        self.body.clear();
        self.granule = NO_GRANULE;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed page.
    pub(crate) struct Page {
        pub(crate) header_type: u8,
        pub(crate) granule: u64,
        pub(crate) serial: u32,
        pub(crate) sequence: u32,
        pub(crate) lacing: Vec<u8>,
        pub(crate) body: Vec<u8>,
    }

    /// Independent bitwise Ogg CRC-32.
    pub(crate) fn crc_bitwise(data: &[u8]) -> u32 {
        let mut crc = 0u32;
        for &b in data {
            crc ^= u32::from(b) << 24;
            for _ in 0..8 {
                crc = if crc & 0x8000_0000 != 0 {
                    (crc << 1) ^ 0x04c1_1db7
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    /// Walks every page of a single-stream Ogg file, checking the capture
    /// pattern, version, CRC (bitwise), serial, sequence numbers, BOS/EOS and
    /// continued flags. Returns the pages and the reassembled packets, each
    /// with the index of the page it completes on.
    pub(crate) fn parse(bytes: &[u8]) -> (Vec<Page>, Vec<(Vec<u8>, usize)>) {
        let mut pages = Vec::new();
        let mut packets = Vec::new();
        let mut partial: Option<Vec<u8>> = None;
        let mut pos = 0;
        while pos < bytes.len() {
            let h = &bytes[pos..];
            assert_eq!(&h[..4], b"OggS", "capture pattern at {pos}");
            assert_eq!(h[4], 0, "version");
            let n = usize::from(h[26]);
            let lacing = h[27..27 + n].to_vec();
            let body_len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
            let len = 27 + n + body_len;
            let mut raw = h[..len].to_vec();
            let stored = u32::from_le_bytes(raw[22..26].try_into().unwrap());
            raw[22..26].fill(0);
            assert_eq!(crc_bitwise(&raw), stored, "CRC of page {}", pages.len());
            let page = Page {
                header_type: h[5],
                granule: u64::from_le_bytes(h[6..14].try_into().unwrap()),
                serial: u32::from_le_bytes(h[14..18].try_into().unwrap()),
                sequence: u32::from_le_bytes(h[18..22].try_into().unwrap()),
                lacing,
                body: h[27 + n..len].to_vec(),
            };
            let idx = pages.len();
            assert_eq!(page.sequence as usize, idx, "sequence number");
            if let Some(first) = pages.first() {
                let first: &Page = first;
                assert_eq!(page.serial, first.serial);
            }
            assert_eq!(
                page.header_type & FLAG_BOS != 0,
                idx == 0,
                "BOS on page {idx}"
            );
            assert_eq!(page.header_type & FLAG_CONTINUED != 0, partial.is_some());
            let mut off = 0;
            let mut completed = false;
            for &l in &page.lacing {
                let l = usize::from(l);
                partial
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(&page.body[off..off + l]);
                off += l;
                if l < 255 {
                    packets.push((partial.take().unwrap(), idx));
                    completed = true;
                }
            }
            if !completed {
                assert_eq!(page.granule, NO_GRANULE, "page {idx} completes no packet");
            }
            pages.push(page);
            pos += len;
        }
        assert!(partial.is_none(), "stream ends inside a packet");
        let last = pages.len() - 1;
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(p.header_type & FLAG_EOS != 0, i == last, "EOS on page {i}");
        }
        (pages, packets)
    }

    #[test]
    fn crc_check_value_and_table_match_bitwise() {
        // CRC-32 with poly 0x04c11db7, init 0, no reflection, no final xor.
        assert_eq!(crc32_update(0, b"123456789"), 0x89a1_897f);
        assert_eq!(crc_bitwise(b"123456789"), 0x89a1_897f);
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(
            crc32_update(crc32_update(0, &data[..1234]), &data[1234..]),
            crc_bitwise(&data)
        );
    }

    /// OpusHead page written by opusenc (libogg), serial 1234.
    const OPUSENC_HEAD_PAGE: &str = "4f67675300020000000000000000d204000000000000725b018a01134f7075734865616401013801803e0000000000";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn crc_of_known_page_and_identical_page() {
        let page = unhex(OPUSENC_HEAD_PAGE);
        let mut zeroed = page.clone();
        zeroed[22..26].fill(0);
        assert_eq!(crc32_update(0, &zeroed), 0x8a01_5b72);
        assert_eq!(crc32_update(0, &zeroed).to_le_bytes(), page[22..26]);

        let mut w = OggPageWriter::new(Vec::new(), 1234);
        w.write_packet(&page[28..], 0, true).unwrap();
        assert_eq!(w.out, page);
    }

    #[test]
    fn lacing_continuation_granules_and_flags() {
        let mut w = OggPageWriter::new(Vec::new(), 7);
        let sizes = [0usize, 255, 254, 510, 70_000, 3];
        let packets: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        w.write_packet(&packets[0], 10, false).unwrap();
        w.write_packet(&packets[1], 20, true).unwrap();
        w.write_packet(&packets[2], 30, false).unwrap();
        w.write_packet(&packets[3], 40, false).unwrap();
        w.write_packet(&packets[4], 50, false).unwrap();
        let bytes = w.finish(&packets[5], 60).unwrap();

        let (pages, got) = parse(&bytes);
        let got_packets: Vec<&Vec<u8>> = got.iter().map(|(p, _)| p).collect();
        assert_eq!(got_packets, packets.iter().collect::<Vec<_>>());
        assert_eq!(pages[0].lacing, [0, 255, 0]);
        assert_eq!(pages[0].granule, 20);
        // Page 1: 254 (1) + 510 (3) + 251 segments of the 70000-byte packet.
        assert_eq!(pages[1].lacing.len(), 255);
        assert_eq!(pages[1].granule, 40);
        assert_eq!(pages[1].header_type, 0);
        // 70000 = 274 * 255 + 130: 23 more full segments, then 130 and the 3.
        assert_eq!(pages[2].header_type, FLAG_CONTINUED | FLAG_EOS);
        assert_eq!(pages[2].lacing.len(), 23 + 2);
        assert_eq!(pages[2].granule, 60);
        assert_eq!(
            got.iter().map(|(_, i)| *i).collect::<Vec<_>>(),
            [0, 0, 1, 1, 2, 2]
        );
    }

    #[test]
    fn page_header_reads_back_what_the_writer_wrote() {
        let mut w = OggPageWriter::new(Vec::new(), 0xDEAD_BEEF);
        w.write_packet(&[7; 300], 0, true).unwrap();
        w.write_packet(&vec![1; 255 * 255 + 3], 1 << 40, false)
            .unwrap();
        let bytes = w.finish(&[2; 10], u64::MAX - 5).unwrap();
        let (pages, _) = parse(&bytes);
        let mut pos = 0;
        for page in &pages {
            let head: &[u8; HEADER_LEN] = bytes[pos..].first_chunk().unwrap();
            let expected = PageHeader {
                flags: page.header_type,
                granule: page.granule,
                serial: page.serial,
                sequence: page.sequence,
            };
            assert_eq!(PageHeader::parse(head), expected);
            pos += HEADER_LEN + page.lacing.len() + page.body.len();
        }
        let flags: Vec<u8> = pages.iter().map(|p| p.header_type).collect();
        assert_eq!(flags, [FLAG_BOS, 0, FLAG_CONTINUED | FLAG_EOS]);
        assert_eq!(pages[2].granule, u64::MAX - 5);
        assert_eq!(pages[1].granule, NO_GRANULE);
    }

    #[test]
    fn page_without_completed_packet_has_no_granule() {
        let mut w = OggPageWriter::new(Vec::new(), 1);
        let big = vec![0xAB; 255 * 255 * 2 + 10];
        w.write_packet(&big, 5, false).unwrap();
        let bytes = w.finish(&[1, 2, 3], 9).unwrap();
        let (pages, packets) = parse(&bytes);
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[0].granule, NO_GRANULE);
        assert_eq!(pages[1].granule, NO_GRANULE);
        assert_eq!(pages[1].header_type, FLAG_CONTINUED);
        assert_eq!(pages[2].granule, 9);
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].0, big);
        assert_eq!(packets[0].1, 2);
    }
}
