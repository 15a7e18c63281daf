//! SigV4 signatures made anew for requests that the test proxy changed on their way to s3s-fs.
//!
//! Some S3-compatible stores (Garage) accept `If-None-Match: *` and ignore it, so a create-only write
//! replaces an existing object. The proxy plays such a store by removing the header
//! ([`Proxy::ignore_conditional_writes`](crate::proxy::Proxy::ignore_conditional_writes)), but s3s-fs
//! checks signatures and `if-none-match` is among the signed headers: a request without it must be
//! signed again, as the client would have signed it had it never sent the header.
//!
//! The new signature keeps everything the client chose: its signing time (`x-amz-date`), its payload
//! hash (`x-amz-content-sha256`, taken as given: the body is not changed), its access key and region
//! (the credential scope), and its signed headers less the removed ones. Only the secret comes from
//! the harness ([`SECRET_KEY`]). Before signing anew, the client's own signature is recomputed and
//! compared: a request the server would refuse (wrong secret) is not turned into one it accepts, and a
//! canonical request built differently from the SDK's shows up as an error rather than as a 403 that
//! looks like a walship bug.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use crate::s3::SECRET_KEY;

/// What the client's `Authorization` header says.
struct Authorization<'a> {
    access_key: &'a str,
    region: &'a str,
    service: &'a str,
    /// Lower-case header names, in the order the client listed them.
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

/// The new `Authorization` value for the request `method target` with `headers` (lower-case names,
/// as they will reach the server, the client's `authorization` among them), which the client signed
/// with the headers in `removed` still present. Errors say why no signature could be made.
pub fn authorization(
    method: &str,
    target: &str,
    headers: &[(String, String)],
    removed: &[(String, String)],
) -> Result<String, String> {
    let original = header(headers, "authorization").ok_or("the request is not signed")?;
    let parsed = parse_authorization(original)?;
    let time = signing_time(header(headers, "x-amz-date").ok_or("no x-amz-date")?)?;
    let payload = header(headers, "x-amz-content-sha256").ok_or("no x-amz-content-sha256")?;

    // The client's own request first: our signature of it must be the one the client made.
    let before: Vec<(String, String)> = headers.iter().chain(removed).cloned().collect();
    let check = signature(method, target, &before, &parsed.signed_headers, &parsed, time, payload)?;
    if check != parsed.signature {
        return Err(format!("the client's signature {} does not check out (ours: {check})", parsed.signature));
    }

    let kept: Vec<&str> =
        parsed.signed_headers.iter().copied().filter(|name| !removed.iter().any(|(n, _)| n == name)).collect();
    let new = signature(method, target, headers, &kept, &parsed, time, payload)?;
    Ok(original
        .replace(
            &format!("SignedHeaders={}", parsed.signed_headers.join(";")),
            &format!("SignedHeaders={}", kept.join(";")),
        )
        .replace(&format!("Signature={}", parsed.signature), &format!("Signature={new}")))
}

/// The SigV4 signature of a request, over the headers named in `signed` only (the ones the client
/// signed: headers its HTTP client added after signing must stay out).
fn signature(
    method: &str,
    target: &str,
    headers: &[(String, String)],
    signed: &[&str],
    auth: &Authorization,
    time: SystemTime,
    payload: &str,
) -> Result<String, String> {
    let host = header(headers, "host").ok_or("no host header")?;
    let uri = format!("http://{host}{target}");
    let chosen =
        headers.iter().filter(|(name, _)| signed.contains(&name.as_str())).map(|(n, v)| (n.as_str(), v.as_str()));
    let request = SignableRequest::new(method, uri, chosen, SignableBody::Precomputed(payload.to_owned()))
        .map_err(|e| format!("signable request: {e}"))?;

    let identity: Identity = Credentials::new(auth.access_key, SECRET_KEY, None, None, "walship-test-proxy").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(auth.region)
        .name(auth.service)
        .time(time)
        .settings(s3_settings())
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let (_, signature) = sign(request, &params).map_err(|e| format!("sign: {e}"))?.into_parts();
    Ok(signature)
}

/// How the SDK signs for S3: the path as sent (S3 keys are not URI paths to clean up, and the SDK
/// encodes them once), and `x-amz-content-sha256` among the signed headers.
fn s3_settings() -> SigningSettings {
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    settings
}

/// `AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=HEX`.
fn parse_authorization(value: &str) -> Result<Authorization<'_>, String> {
    let fields = value.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(|| format!("not SigV4: {value:?}"))?;
    let field = |name: &str| {
        fields
            .split(',')
            .find_map(|f| f.trim().strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("no {name} in {value:?}"))
    };
    let scope: Vec<&str> = field("Credential")?.split('/').collect();
    let [access_key, _date, region, service, "aws4_request"] = scope[..] else {
        return Err(format!("credential scope {scope:?}"));
    };
    Ok(Authorization {
        access_key,
        region,
        service,
        signed_headers: field("SignedHeaders")?.split(';').collect(),
        signature: field("Signature")?,
    })
}

/// The time in an `x-amz-date` value (`20260102T030405Z`, always UTC).
fn signing_time(value: &str) -> Result<SystemTime, String> {
    let bad = || format!("x-amz-date {value:?}");
    let digits = |range: std::ops::Range<usize>| -> Result<u64, String> {
        value.get(range).filter(|d| d.bytes().all(|b| b.is_ascii_digit())).ok_or_else(bad)?.parse().map_err(|_| bad())
    };
    if value.len() != 16 || &value[8..9] != "T" || !value.ends_with('Z') {
        return Err(bad());
    }
    let days = days_since_epoch(digits(0..4)?, digits(4..6)?, digits(6..8)?).ok_or_else(bad)?;
    let seconds = days * 86_400 + digits(9..11)? * 3_600 + digits(11..13)? * 60 + digits(13..15)?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`), for dates from 1970 on.
fn days_since_epoch(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Years counted from March, so that the leap day is the last of the year.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year % 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}
