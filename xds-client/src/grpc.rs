//! One bidirectional gRPC call of protobuf messages (an ADS stream) over the channel, whose
//! receive buffer does not outlive a large message.
//!
//! tonic's `Streaming` keeps its receive buffer at the size of the largest message it has
//! decoded: a sidecar's first EDS response (1.1 MB for 10,000 endpoints) stayed resident as a
//! 1.4 MB buffer for as long as the stream lived, 7% of an idle sidecar's memory. Here a
//! buffer that grew past [`KEEP`] is given back once its message is decoded. Messages are
//! framed as gRPC frames them (a compression flag and a big-endian length); nothing is
//! compressed, and no compression is offered to the server.
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio_stream::{Stream, StreamExt};
use tonic::{
    Code, Status,
    body::Body,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};
use tower::ServiceExt;

/// A receive buffer with more room than this is given back after its message.
const KEEP: usize = 64 * 1024;

/// The gRPC message prefix: the compression flag and the length.
const PREFIX: usize = 5;

/// The responses of an open call.
pub struct Responses<M> {
    body: Body,
    buf: BytesMut,
    limit: usize,
    /// The server ended the call with an OK status.
    ended: bool,
    message: PhantomData<fn() -> M>,
}

/// Opens the call `path` (`/package.Service/Method`) on `channel`, sending `requests`, with
/// `bearer` as its `authorization`; responses larger than `limit` bytes end it. Returns once
/// the server has answered with its headers, as tonic's generated clients do.
pub async fn open<Req, Resp>(
    channel: Channel,
    path: &'static str,
    bearer: Option<MetadataValue<Ascii>>,
    requests: impl Stream<Item = Req> + Send + 'static,
    limit: usize,
) -> Result<Responses<Resp>, Status>
where
    Req: Outgoing + 'static,
{
    let frames = requests.map(|r| encode(&r).map(Frame::data));
    let mut request = http::Request::new(Body::new(StreamBody::new(frames)));
    *request.method_mut() = http::Method::POST;
    *request.version_mut() = http::Version::HTTP_2;
    // The path alone: the channel adds its scheme and authority.
    *request.uri_mut() = http::Uri::from_static(path);
    let headers = request.headers_mut();
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Some(token) = bearer {
        // A metadata value is a valid header value.
        if let Ok(value) = HeaderValue::from_bytes(token.as_encoded_bytes()) {
            headers.insert(header::AUTHORIZATION, value);
        }
    }
    let response = channel
        .oneshot(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = response.into_parts();
    // A status in the headers is a trailers-only answer: the call ended there.
    let ended = match Status::from_header_map(&parts.headers) {
        Some(status) if status.code() != Code::Ok => return Err(status),
        Some(_) => true,
        None if parts.status != StatusCode::OK => return Err(http_status(parts.status)),
        None => false,
    };
    Ok(Responses {
        body,
        buf: BytesMut::new(),
        limit,
        ended,
        message: PhantomData,
    })
}

impl<M: prost::Message + Default> Responses<M> {
    /// The next response; `None` once the server ended the call with an OK status.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            if self.ended {
                if !self.buf.is_empty() {
                    return Err(Status::internal("the call ended inside a message"));
                }
                return Ok(None);
            }
            let Some(frame) = self.body.frame().await else {
                return Err(Status::internal("the call ended without a status"));
            };
            let frame = frame?;
            match frame.into_data() {
                Ok(data) => self.buf.put(data),
                Err(frame) => {
                    let Some(trailers) = frame.trailers_ref() else {
                        continue;
                    };
                    match Status::from_header_map(trailers) {
                        Some(status) if status.code() == Code::Ok => self.ended = true,
                        Some(status) => return Err(status),
                        None => return Err(Status::internal("the call ended without a status")),
                    }
                }
            }
        }
    }

    /// A whole message from the buffer, if one is there.
    fn decode(&mut self) -> Result<Option<M>, Status> {
        let Some(prefix) = self.buf.get(..PREFIX) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(Status::internal(
                "a compressed message, though no compression was offered",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.limit {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes, more than the {} accepted",
                self.limit
            )));
        }
        let Some(body) = self.buf.get(PREFIX..PREFIX + len) else {
            return Ok(None);
        };
        let message = M::decode(body).map_err(|e| Status::internal(e.to_string()))?;
        self.buf.advance(PREFIX + len);
        if self.buf.capacity() > KEEP {
            // Only what is left (the start of the next message, if any) moves.
            self.buf = BytesMut::from(&self.buf[..]);
        }
        Ok(Some(message))
    }
}

/// A request as the call writes it: its protobuf encoding and that encoding's length.
pub trait Outgoing {
    fn encoded_len(&self) -> usize;
    fn encode_raw(&self, buf: &mut BytesMut);
}

impl<M: prost::Message> Outgoing for M {
    fn encoded_len(&self) -> usize {
        prost::Message::encoded_len(self)
    }

    fn encode_raw(&self, buf: &mut BytesMut) {
        prost::Message::encode_raw(self, buf);
    }
}

/// A message as a gRPC frame: uncompressed, with its length.
fn encode(message: &impl Outgoing) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let framed = u32::try_from(len).map_err(|_| Status::out_of_range("a request of 4 GiB"))?;
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(framed);
    message.encode_raw(&mut buf);
    Ok(buf.freeze())
}

/// The status of an answer that is not gRPC (a proxy's error page), as gRPC maps HTTP.
fn http_status(status: StatusCode) -> Status {
    let code = match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {status}"))
}

#[cfg(test)]
mod tests {
    use tern_proto::DiscoveryResponse;

    use super::*;

    /// Responses over a body of these frames.
    fn responses(frames: Vec<Frame<Bytes>>) -> Responses<DiscoveryResponse> {
        let frames = tokio_stream::iter(frames.into_iter().map(Ok::<_, Status>));
        Responses {
            body: Body::new(StreamBody::new(frames)),
            buf: BytesMut::new(),
            limit: 1 << 20,
            ended: false,
            message: PhantomData,
        }
    }

    fn response(version: &str, padding: usize) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            nonce: "n".repeat(padding),
            ..Default::default()
        }
    }

    fn trailers(code: Code) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from(code as i32));
        Frame::trailers(map)
    }

    #[tokio::test]
    async fn messages_cut_anywhere_arrive_whole_and_a_large_buffer_is_given_back() {
        let mut wire = BytesMut::new();
        for (v, padding) in [("1", 10), ("2", 300_000), ("3", 10)] {
            wire.put(encode(&response(v, padding)).unwrap());
        }
        // Frames of 7 bytes and of 16 KiB, so prefixes and messages are split.
        let mut frames = vec![Frame::data(wire.split_to(7).freeze())];
        while !wire.is_empty() {
            let n = wire.len().min(16 * 1024);
            frames.push(Frame::data(wire.split_to(n).freeze()));
        }
        frames.push(trailers(Code::Ok));
        let mut r = responses(frames);
        assert_eq!(r.message().await.unwrap().unwrap().version_info, "1");
        let large = r.message().await.unwrap().unwrap();
        assert_eq!(
            (large.version_info.as_str(), large.nonce.len()),
            ("2", 300_000)
        );
        assert!(r.buf.capacity() <= KEEP, "kept {} bytes", r.buf.capacity());
        assert_eq!(r.message().await.unwrap().unwrap().version_info, "3");
        assert!(r.message().await.unwrap().is_none(), "ended with OK");
    }

    #[tokio::test]
    async fn a_status_ends_the_call_and_bad_frames_are_errors() {
        let mut r = responses(vec![trailers(Code::PermissionDenied)]);
        assert_eq!(
            r.message().await.unwrap_err().code(),
            Code::PermissionDenied
        );

        // No status at all: the server went away.
        let mut r = responses(vec![]);
        assert_eq!(r.message().await.unwrap_err().code(), Code::Internal);

        // A message cut short by the status.
        let whole = encode(&response("1", 100)).unwrap();
        let mut r = responses(vec![Frame::data(whole.slice(..50)), trailers(Code::Ok)]);
        assert_eq!(r.message().await.unwrap_err().code(), Code::Internal);

        // Compressed, though nothing was offered.
        let mut compressed = BytesMut::from(&whole[..]);
        compressed[0] = 1;
        let mut r = responses(vec![Frame::data(compressed.freeze())]);
        assert_eq!(r.message().await.unwrap_err().code(), Code::Internal);

        // Longer than the limit: refused from its prefix, before its bytes arrive.
        let mut r = responses(vec![Frame::data(Bytes::from_static(&[0, 0x7f, 0, 0, 0]))]);
        assert_eq!(r.message().await.unwrap_err().code(), Code::OutOfRange);

        // Bytes that are not the message.
        let mut r = responses(vec![Frame::data(Bytes::from_static(&[
            0, 0, 0, 0, 2, 0xff, 0xff,
        ]))]);
        assert_eq!(r.message().await.unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn http_answers_that_are_not_grpc_map_as_grpc_says() {
        assert_eq!(
            http_status(StatusCode::UNAUTHORIZED).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            http_status(StatusCode::SERVICE_UNAVAILABLE).code(),
            Code::Unavailable
        );
        assert_eq!(http_status(StatusCode::IM_A_TEAPOT).code(), Code::Unknown);
    }
}
