//! TOTP (RFC 6238) over HOTP (RFC 4226): HMAC-SHA1, 6 digits, 30-second steps.

use hmac::{Hmac, Mac};
use sha1::Sha1;

pub const STEP_SECONDS: u64 = 30;
pub const DIGITS: u32 = 6;
/// Codes from one step before or after are accepted, for clock drift.
pub const DRIFT_STEPS: u64 = 1;

/// The HOTP value of `secret` at `counter`, as a zero-padded decimal string.
pub fn hotp(secret: &[u8], counter: u64) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let binary = (u32::from(digest[offset]) & 0x7f) << 24
        | u32::from(digest[offset + 1]) << 16
        | u32::from(digest[offset + 2]) << 8
        | u32::from(digest[offset + 3]);
    format!("{:0width$}", binary % 10u32.pow(DIGITS), width = DIGITS as usize)
}

/// The time step of a Unix time.
pub fn step_at(unix_seconds: u64) -> u64 {
    unix_seconds / STEP_SECONDS
}

/// The code for a Unix time.
pub fn code_at(secret: &[u8], unix_seconds: u64) -> String {
    hotp(secret, step_at(unix_seconds))
}

/// The step whose code matches, within the drift window and strictly after
/// `last_used_step`, so each code works once.
pub fn verify(secret: &[u8], code: &str, unix_seconds: u64, last_used_step: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_at(unix_seconds);
    let mut matched = None;
    // Every candidate is computed, so timing does not reveal which one matched.
    for step in now.saturating_sub(DRIFT_STEPS)..=now + DRIFT_STEPS {
        let candidate = hotp(secret, step);
        if subtle::ConstantTimeEq::ct_eq(candidate.as_bytes(), code.as_bytes()).into() && step > last_used_step {
            matched = Some(step);
        }
    }
    matched
}

/// The otpauth:// URI authenticator apps scan.
pub fn otpauth_uri(issuer: &str, account: &str, secret_base32: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={}&period={}",
        enc(issuer),
        enc(account),
        secret_base32,
        enc(issuer),
        DIGITS,
        STEP_SECONDS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows (8 digits there; the last 6 here).
    #[test]
    fn matches_the_rfc_6238_test_vectors() {
        let secret = b"12345678901234567890";
        for (time, expected8) in [
            (59u64, "94287082"),
            (1111111109, "07081804"),
            (1111111111, "14050471"),
            (1234567890, "89005924"),
            (2000000000, "69279037"),
            (20000000000, "65353130"),
        ] {
            assert_eq!(code_at(secret, time), expected8[2..], "t={time}");
        }
    }

    #[test]
    fn a_code_works_once_within_its_window() {
        let secret = b"12345678901234567890";
        let now = 1_700_000_000;
        let code = code_at(secret, now);
        let step = verify(secret, &code, now, 0).expect("accepted");
        assert_eq!(step, step_at(now));
        assert_eq!(verify(secret, &code, now, step), None, "replay refused");
        assert_eq!(verify(secret, &code, now + 30, 0), Some(step), "one step of drift is fine");
        assert_eq!(verify(secret, &code, now + 90, 0), None, "three steps later it has expired");
        assert_eq!(verify(secret, "12345", now, 0), None);
        assert_eq!(verify(secret, "abcdef", now, 0), None);
    }

    #[test]
    fn the_uri_names_issuer_account_and_secret() {
        let uri = otpauth_uri("Ledger", "ann@example.com", "JBSWY3DPEHPK3PXP");
        assert_eq!(
            uri,
            "otpauth://totp/Ledger:ann@example.com?secret=JBSWY3DPEHPK3PXP&issuer=Ledger&algorithm=SHA1&digits=6&period=30"
        );
    }
}
