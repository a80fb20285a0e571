//! `saga-proto`: the `saga.v1` wire contract as Rust types.
//!
//! The one place the protobuf files (`saga/v1/*.proto`, copied from the
//! shared contract) are compiled. `sagad`, `saga-sdk`, `sagactl`,
//! `saga-bench` and the tests all use these types, so a message built by one
//! is the same type in every other. Field names and numbers never change
//! meaning; fields, messages and RPCs may be added.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("saga.v1");

/// The canonical name of a gRPC status code (`INVALID_ARGUMENT`), as the
/// gRPC specification spells it: what `sagad` records for a participant's
/// error and what the tools print.
pub fn status_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The codec of every generated client and server: prost's, except that a
/// message that does not decode — bad wire bytes, a string field that is
/// not UTF-8 — is `INVALID_ARGUMENT` (the sender's bad input, naming the
/// field prost names) rather than `INTERNAL` (a fault of ours).
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
    use tonic::{Code, Status};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// See the module documentation.
    #[derive(Debug, Clone)]
    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Codec(PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = StrictDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::default().encoder()
        }

        fn decoder(&mut self) -> Self::Decoder {
            StrictDecoder(ProstCodec::<T, U>::default().decoder())
        }
    }

    /// prost's decoder with its errors as `INVALID_ARGUMENT`.
    #[derive(Debug, Clone)]
    pub struct StrictDecoder<U>(ProstDecoder<U>);

    impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(buf).map_err(|s| match s.code() {
                Code::Internal => {
                    let m: String = s.message().chars().take(200).collect();
                    Status::invalid_argument(format!("the message does not decode: {m}"))
                }
                _ => s,
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }
}

/// W3C Trace Context as gRPC metadata (`traceparent`, `tracestate`): the one
/// parser and formatter of the header, shared by `sagad` and the SDK.
///
/// `traceparent` is `00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags:
/// 2 hex>`. A header that does not parse is ignored, as the W3C
/// recommendation asks (the receiver starts a new trace), never an error.
pub mod trace {
    use std::fmt;

    use tonic::metadata::{MetadataMap, MetadataValue};

    /// The metadata key of the trace parent.
    pub const TRACEPARENT: &str = "traceparent";
    /// The metadata key of the vendors' trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// Longest `tracestate` passed on (the recommendation's 512 characters);
    /// a longer one is dropped.
    pub const TRACESTATE_BYTES_MAX: usize = 512;
    /// The `sampled` bit of the trace flags.
    pub const FLAG_SAMPLED: u8 = 1;

    /// A parsed `traceparent`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct TraceParent {
        /// Never all zero.
        pub trace_id: [u8; 16],
        /// The caller's span; never all zero.
        pub span_id: [u8; 8],
        /// Trace flags ([`FLAG_SAMPLED`]).
        pub flags: u8,
    }

    impl TraceParent {
        /// Parses a header value (version `00`, or a later version read as
        /// `00` as the recommendation says); `None` when it is not one.
        pub fn parse(s: &str) -> Option<TraceParent> {
            // Bytes, not `str` slices: a header is not always ASCII.
            let b = s.as_bytes();
            if b.len() < 55 || (b.len() > 55 && (&b[..2] == b"00" || b[55] != b'-')) {
                return None;
            }
            if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' || &b[..2] == b"ff" {
                return None;
            }
            let _version: [u8; 1] = hex(&b[..2])?;
            let trace_id: [u8; 16] = hex(&b[3..35])?;
            let span_id: [u8; 8] = hex(&b[36..52])?;
            let [flags] = hex(&b[53..55])?;
            if trace_id == [0; 16] || span_id == [0; 8] {
                return None;
            }
            Some(TraceParent {
                trace_id,
                span_id,
                flags,
            })
        }

        /// Whether the caller records this trace.
        pub fn sampled(&self) -> bool {
            self.flags & FLAG_SAMPLED != 0
        }

        /// The same trace and flags under another span.
        pub fn child(&self, span_id: [u8; 8]) -> TraceParent {
            TraceParent { span_id, ..*self }
        }

        /// The trace id as 32 lowercase hex digits (what tracing back ends
        /// search by).
        pub fn trace_id_hex(&self) -> String {
            to_hex(&self.trace_id)
        }

        /// The trace parent a request carries, with its trace state, if
        /// it carries one that parses.
        pub fn from_metadata(md: &MetadataMap) -> Option<(TraceParent, Option<String>)> {
            let tp = TraceParent::parse(md.get(TRACEPARENT)?.to_str().ok()?)?;
            let state = md
                .get(TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.len() <= TRACESTATE_BYTES_MAX)
                .map(str::to_owned);
            Some((tp, state))
        }

        /// Puts this trace parent (and `state`) on a request.
        pub fn to_metadata(&self, md: &mut MetadataMap, state: Option<&str>) {
            if let Ok(v) = MetadataValue::try_from(self.to_string()) {
                md.insert(TRACEPARENT, v);
            }
            if let Some(v) = state.and_then(|s| MetadataValue::try_from(s).ok()) {
                md.insert(TRACESTATE, v);
            }
        }
    }

    impl fmt::Display for TraceParent {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "00-{}-{}-{:02x}",
                to_hex(&self.trace_id),
                to_hex(&self.span_id),
                self.flags
            )
        }
    }

    /// Lowercase hex of `bytes`.
    pub fn to_hex(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 0xf)] as char);
        }
        s
    }

    /// A span id from its 16 lowercase hex digits.
    pub fn span_id_from_hex(s: &str) -> Option<[u8; 8]> {
        hex(s.as_bytes()).filter(|id| *id != [0; 8])
    }

    /// Exactly `2 * N` lowercase hex digits (the recommendation refuses
    /// uppercase).
    fn hex<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
        if b.len() != 2 * N {
            return None;
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

        #[test]
        fn parses_and_formats_the_recommendations_example() {
            let tp = TraceParent::parse(GOOD).expect("parses");
            assert!(tp.sampled());
            assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(tp.to_string(), GOOD);
            let child = tp.child([1; 8]);
            assert_eq!(
                child.to_string(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0101010101010101-01"
            );
        }

        #[test]
        fn refuses_what_the_recommendation_refuses() {
            for bad in [
                "",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
                "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ] {
                assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
            }
            // A later version may append fields after a dash.
            let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
            assert!(TraceParent::parse(later).is_some());
        }

        #[test]
        fn metadata_round_trip_drops_an_oversized_state() {
            let tp = TraceParent::parse(GOOD).expect("parses");
            let mut md = MetadataMap::new();
            tp.to_metadata(&mut md, Some("vendor=abc"));
            assert_eq!(
                TraceParent::from_metadata(&md),
                Some((tp, Some("vendor=abc".to_owned())))
            );
            let long = "k=".to_owned() + &"v".repeat(TRACESTATE_BYTES_MAX);
            tp.to_metadata(&mut md, Some(&long));
            assert_eq!(TraceParent::from_metadata(&md), Some((tp, None)));
        }
    }
}
