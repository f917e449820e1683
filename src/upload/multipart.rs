//! A `multipart/form-data` body built the way the OpenAI SDKs build theirs: one part per field,
//! text parts without a content type, the file part with its filename and media type.
//!
//! Deliberately small: the whole body is built in memory (an utterance is at most a few hundred
//! kilobytes), and names and filenames are hark's own, so only quotes and line breaks need escaping.

/// A form being built.
pub(crate) struct Form {
    boundary: String,
    body: Vec<u8>,
}

impl Default for Form {
    fn default() -> Self {
        Self::new()
    }
}

impl Form {
    pub(crate) fn new() -> Form {
        let r = crate::spool::random_u32() as u64;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Form {
            boundary: format!("hark-{:016x}{:08x}", t, r),
            body: Vec::new(),
        }
    }

    /// A text field.
    pub(crate) fn text(&mut self, name: &str, value: &str) {
        self.head(name, None, None);
        self.body.extend_from_slice(value.as_bytes());
        self.body.extend_from_slice(b"\r\n");
    }

    /// A file field.
    pub(crate) fn file(&mut self, name: &str, filename: &str, media_type: &str, data: &[u8]) {
        self.head(name, Some(filename), Some(media_type));
        self.body.extend_from_slice(data);
        self.body.extend_from_slice(b"\r\n");
    }

    fn head(&mut self, name: &str, filename: Option<&str>, media_type: Option<&str>) {
        let mut h = format!(
            "--{}\r\nContent-Disposition: form-data; name=\"{}\"",
            self.boundary,
            escape(name)
        );
        if let Some(f) = filename {
            h.push_str(&format!("; filename=\"{}\"", escape(f)));
        }
        h.push_str("\r\n");
        if let Some(t) = media_type {
            h.push_str(&format!("Content-Type: {t}\r\n"));
        }
        h.push_str("\r\n");
        self.body.extend_from_slice(h.as_bytes());
    }

    /// The `Content-Type` header value and the body.
    pub(crate) fn finish(mut self) -> (String, Vec<u8>) {
        self.body
            .extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        (
            format!("multipart/form-data; boundary={}", self.boundary),
            self.body,
        )
    }
}

/// Percent-escape what would break a quoted header parameter (as browsers and httpx do).
fn escape(s: &str) -> String {
    s.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_framed_by_the_boundary() {
        let mut f = Form::new();
        f.file("file", "u1.ogg", "audio/ogg", b"OggS\0\r\n--x");
        f.text("model", "whisper-1");
        f.text("timestamp_granularities[]", "word");
        let (ct, body) = f.finish();
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        let expected = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"u1.ogg\"\r\n\
             Content-Type: audio/ogg\r\n\r\nOggS\0\r\n--x\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"timestamp_granularities[]\"\r\n\r\nword\r\n\
             --{b}--\r\n",
            b = boundary
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn quotes_and_newlines_cannot_break_a_header() {
        assert_eq!(escape("a\"b\r\nc"), "a%22b%0D%0Ac");
    }
}
