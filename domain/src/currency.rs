//! ISO 4217 currencies and their minor units.

use std::fmt;

/// An ISO 4217 currency the ledger accepts, with its number of minor-unit digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

/// Active ISO 4217 codes whose minor unit is not 2.
const NON_TWO_DIGIT: &[(&str, u32)] = &[
    ("BIF", 0),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("ISK", 0),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("PYG", 0),
    ("RWF", 0),
    ("UGX", 0),
    ("UYI", 0),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
    ("BHD", 3),
    ("IQD", 3),
    ("JOD", 3),
    ("KWD", 3),
    ("LYD", 3),
    ("OMR", 3),
    ("TND", 3),
    ("CLF", 4),
    ("UYW", 4),
];

/// Active ISO 4217 codes with two minor-unit digits.
const TWO_DIGIT: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BMD", "BND",
    "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CNY", "COP", "CRC", "CUP", "CVE", "CZK",
    "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR", "KPW", "KYD", "KZT", "LAK",
    "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN",
    "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON",
    "RSD", "RUB", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP",
    "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "USD", "UYU", "UZS", "VES", "WST", "XCD",
    "YER", "ZAR", "ZMW", "ZWG",
];

impl Currency {
    /// Looks up an ISO 4217 code; codes are upper-case, exactly three letters.
    pub fn from_code(code: &str) -> Option<Currency> {
        if let Some((c, m)) = NON_TWO_DIGIT.iter().find(|(c, _)| *c == code) {
            return Some(Currency { code: c, minor_units: *m });
        }
        TWO_DIGIT.iter().find(|c| **c == code).map(|c| Currency { code: c, minor_units: 2 })
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn minor_units(&self) -> u32 {
        self.minor_units
    }

    /// Every currency the ledger knows, for documentation and tests.
    pub fn all() -> impl Iterator<Item = Currency> {
        NON_TWO_DIGIT
            .iter()
            .map(|(c, m)| Currency { code: c, minor_units: *m })
            .chain(TWO_DIGIT.iter().map(|c| Currency { code: c, minor_units: 2 }))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_follow_iso_4217() {
        for (code, units) in [("USD", 2), ("EUR", 2), ("RUB", 2), ("CNY", 2), ("JPY", 0), ("KWD", 3)] {
            assert_eq!(Currency::from_code(code).map(|c| c.minor_units()), Some(units), "{code}");
        }
    }

    #[test]
    fn unknown_and_lower_case_codes_are_refused() {
        for code in ["usd", "XXX", "US", "USDD", "", "ZZZ"] {
            assert!(Currency::from_code(code).is_none(), "{code}");
        }
    }

    #[test]
    fn no_code_is_listed_twice() {
        let mut codes: Vec<_> = Currency::all().map(|c| c.code()).collect();
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
    }
}
