//! Amounts of money: parsing and validation rules shared by every command.

use crate::{Currency, DomainError};
use rust_decimal::Decimal;
use std::str::FromStr;

/// Amounts must stay below this bound (10^12 in the currency's major unit), far
/// beyond any real movement, so sums of balances never approach Decimal's range.
pub const MAX_AMOUNT_EXCLUSIVE: i64 = 1_000_000_000_000;

/// A positive amount of money, not yet tied to a currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount(Decimal);

impl Amount {
    /// Parses a decimal string such as `"12.30"`. Only plain digits with an
    /// optional fractional part are accepted: no sign, no exponent, no spaces.
    pub fn parse(field: &str, text: &str) -> Result<Amount, DomainError> {
        let invalid = |message: &str| DomainError::validation(field, message);
        let (int, frac) = match text.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (text, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(int) || frac.is_some_and(|f| !digits(f)) {
            return Err(invalid(
                "must be a decimal string such as \"12.30\" (digits, optional fraction; no sign or exponent)",
            ));
        }
        if int.len() > 1 && int.starts_with('0') {
            return Err(invalid("must not have leading zeros"));
        }
        if int.len() > 13 {
            return Err(invalid("is too large"));
        }
        if frac.is_some_and(|f| f.len() > 18) {
            return Err(invalid("has too many fraction digits"));
        }
        let value = Decimal::from_str(text).map_err(|_| invalid("is not a valid decimal"))?;
        Self::new(field, value)
    }

    /// Validates an already-decimal value (positive, under the maximum).
    pub fn new(field: &str, value: Decimal) -> Result<Amount, DomainError> {
        if value <= Decimal::ZERO {
            return Err(DomainError::validation(field, "must be greater than zero"));
        }
        if value >= Decimal::from(MAX_AMOUNT_EXCLUSIVE) {
            return Err(DomainError::validation(field, "must be less than 1000000000000"));
        }
        Ok(Amount(value))
    }

    /// Checks that the amount has no more fraction digits than the currency has minor units.
    pub fn in_currency(self, field: &str, currency: Currency) -> Result<Decimal, DomainError> {
        if self.0.scale() > currency.minor_units() {
            return Err(DomainError::validation(
                field,
                format!(
                    "has more than {} fraction digits, the minor units of {}",
                    currency.minor_units(),
                    currency.code()
                ),
            ));
        }
        Ok(to_minor_units(self.0, currency))
    }

    pub fn value(self) -> Decimal {
        self.0
    }
}

/// Formats a value with exactly the currency's minor-unit digits ("12.30", "500").
pub fn to_minor_units(value: Decimal, currency: Currency) -> Decimal {
    let mut v = value;
    v.rescale(currency.minor_units());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::from_code("USD").unwrap()
    }

    #[test]
    fn accepts_plain_decimals_within_minor_units() {
        for (text, want) in
            [("12.30", "12.30"), ("1", "1.00"), ("0.01", "0.01"), ("999999999999.99", "999999999999.99")]
        {
            let a = Amount::parse("amount", text).unwrap();
            assert_eq!(a.in_currency("amount", usd()).unwrap().to_string(), want);
        }
    }

    #[test]
    fn refuses_zero_negative_exponent_garbage_and_too_many_digits() {
        for text in [
            "0",
            "0.00",
            "-1",
            "+1",
            "1e3",
            "1E3",
            " 1",
            "1 ",
            "abc",
            "",
            ".5",
            "5.",
            "1,5",
            "0x10",
            "01",
            "1000000000000",
            "NaN",
            "1.2.3",
        ] {
            let err = Amount::parse("amount", text).err().unwrap_or_else(|| panic!("{text} accepted"));
            assert!(matches!(err, DomainError::Validation { ref field, .. } if field == "amount"), "{text}: {err:?}");
        }
        let a = Amount::parse("amount", "1.001").unwrap();
        assert!(a.in_currency("amount", usd()).is_err());
        let jpy = Currency::from_code("JPY").unwrap();
        assert!(Amount::parse("amount", "1.5").unwrap().in_currency("amount", jpy).is_err());
        assert!(Amount::parse("amount", "1.000").unwrap().in_currency("amount", usd()).is_err());
    }
}
