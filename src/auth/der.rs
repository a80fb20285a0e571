//! Just enough DER to read what authentication needs from certificates and
//! public keys: a certificate's subject (as `CN=…,O=…` text) and a
//! SubjectPublicKeyInfo's algorithm and key bytes.
//!
//! Input comes from outside (client certificates, key files), so every read
//! is bounds-checked and an error, never a panic. Only definite lengths are
//! accepted (DER has no others).

/// Why DER did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed DER: {0}")]
pub struct DerError(&'static str);

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const BIT_STRING: u8 = 0x03;
const CONTEXT_0: u8 = 0xa0;

/// A cursor over DER bytes.
#[derive(Debug, Clone, Copy)]
pub struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Der(bytes)
    }

    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next element: its tag and contents.
    pub fn element(&mut self) -> Result<(u8, &'a [u8]), DerError> {
        let (&tag, rest) = self.0.split_first().ok_or(DerError("truncated"))?;
        let (&first, rest) = rest.split_first().ok_or(DerError("truncated length"))?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(DerError("bad length"));
            }
            let (bytes, rest) = rest.split_at(n);
            (
                bytes
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
                rest,
            )
        };
        if rest.len() < len {
            return Err(DerError("element longer than its container"));
        }
        let (body, rest) = rest.split_at(len);
        self.0 = rest;
        Ok((tag, body))
    }

    /// The next element, which must have `tag`.
    pub fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], DerError> {
        match self.element()? {
            (t, body) if t == tag => Ok(body),
            _ => Err(DerError(what)),
        }
    }
}

/// The subject of an X.509 certificate as `TYPE=value` pairs joined by `,`,
/// in the certificate's order (`CN=bank-a,O=Example`). Types other than the
/// common ones are written as dotted OIDs.
pub fn certificate_subject(cert: &[u8]) -> Result<String, DerError> {
    let mut cert = Der::new(Der::new(cert).expect(SEQUENCE, "certificate")?);
    let mut tbs = Der::new(cert.expect(SEQUENCE, "tbsCertificate")?);
    let (mut tag, _) = tbs.element()?;
    if tag == CONTEXT_0 {
        tag = tbs.element()?.0; // serial number after the explicit version
    }
    if tag != 0x02 {
        return Err(DerError("serial number"));
    }
    tbs.expect(SEQUENCE, "signature algorithm")?;
    tbs.expect(SEQUENCE, "issuer")?;
    tbs.expect(SEQUENCE, "validity")?;
    name_text(tbs.expect(SEQUENCE, "subject")?)
}

/// An X.501 Name (the contents of its SEQUENCE) as text.
fn name_text(name: &[u8]) -> Result<String, DerError> {
    let mut parts = Vec::new();
    let mut rdns = Der::new(name);
    while !rdns.is_empty() {
        let mut set = Der::new(rdns.expect(SET, "relative distinguished name")?);
        while !set.is_empty() {
            let mut atv = Der::new(set.expect(SEQUENCE, "attribute")?);
            let oid = atv.expect(OID, "attribute type")?;
            let (_, value) = atv.element()?;
            let value = std::str::from_utf8(value).map_err(|_| DerError("attribute value"))?;
            parts.push(format!("{}={value}", attribute_name(oid)));
        }
    }
    Ok(parts.join(","))
}

fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress".into(),
        other => oid_text(other),
    }
}

/// A dotted OID from its encoding.
pub fn oid_text(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// A SubjectPublicKeyInfo: the algorithm OID, its parameter OID (the curve
/// of an EC key), and the key bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Spki<'a> {
    /// Dotted algorithm OID.
    pub algorithm: String,
    /// Dotted parameter OID, when the parameter is one.
    pub parameter: Option<String>,
    /// The subjectPublicKey bits (whole bytes).
    pub key: &'a [u8],
}

/// Parses a DER SubjectPublicKeyInfo (a PEM `PUBLIC KEY`).
pub fn spki(der: &[u8]) -> Result<Spki<'_>, DerError> {
    let mut outer = Der::new(Der::new(der).expect(SEQUENCE, "SubjectPublicKeyInfo")?);
    let mut alg = Der::new(outer.expect(SEQUENCE, "algorithm")?);
    let algorithm = oid_text(alg.expect(OID, "algorithm OID")?);
    let parameter = match alg.element() {
        Ok((OID, p)) => Some(oid_text(p)),
        _ => None,
    };
    let bits = outer.expect(BIT_STRING, "subjectPublicKey")?;
    match bits.split_first() {
        Some((0, key)) => Ok(Spki {
            algorithm,
            parameter,
            key,
        }),
        _ => Err(DerError("subjectPublicKey has unused bits")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_render_dotted() {
        assert_eq!(
            oid_text(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]),
            "1.2.840.113549.1.1.1"
        );
        assert_eq!(oid_text(&[0x2b, 0x81, 0x04, 0x00, 0x22]), "1.3.132.0.34");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x05, 1],
            &[0x30, 0x82, 0xff, 0xff],
            &[0x30, 0x00],
        ] {
            assert!(certificate_subject(bytes).is_err(), "{bytes:?}");
            assert!(spki(bytes).is_err(), "{bytes:?}");
        }
    }
}
