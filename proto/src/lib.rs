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
