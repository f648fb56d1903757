//! Comparison rules between item values and filter operands.
//!
//! Tidings has no schema, so these rules decide how JSON values of different types compare:
//! numbers and numeric strings compare numerically, strings that are both dates compare as
//! instants, `true`/`"true"` are equal, and everything else compares exactly. The same rules
//! define [`index_key`], so an index built from it agrees with `_eq`.

use std::cmp::Ordering;

use jiff::{civil, tz::TimeZone, SignedDuration, Span, Timestamp};
use serde_json::{Number, Value};

/// `2^127` as an `f64`: the first float beyond the `i128` range.
const I128_BOUND: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;

/// A number normalized so that equal numbers have equal representations: integral values that
/// fit an `i128` are `Int`, every other finite value is `Float`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    /// An integral value.
    Int(i128),
    /// A finite value that is not integral or lies outside the `i128` range.
    Float(f64),
}

impl Num {
    /// Normalizes a float; `None` for NaN and infinities.
    fn from_f64(f: f64) -> Option<Num> {
        if !f.is_finite() {
            return None;
        }
        if f.fract() == 0.0 && (-I128_BOUND..I128_BOUND).contains(&f) {
            // In range and integral, so the cast is exact.
            Some(Num::Int(f as i128))
        } else {
            Some(Num::Float(f))
        }
    }

    /// The numeric value of a JSON number.
    pub(crate) fn from_number(n: &Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else {
            n.as_f64().and_then(Num::from_f64)
        }
    }

    /// Parses a numeric string: `[+-]digits[.digits][e[+-]digits]` (also `5.` and `.5`).
    /// Surrounding whitespace, `inf`, `NaN`, hex and out-of-range values are not numeric.
    pub(crate) fn parse(s: &str) -> Option<Num> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > 512 {
            return None;
        }
        let mut i = 0;
        if matches!(b.first(), Some(b'+' | b'-')) {
            i = 1;
        }
        let digits = |i: &mut usize| {
            let start = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i - start
        };
        let int_digits = digits(&mut i);
        let mut is_float = false;
        let mut frac_digits = 0;
        if b.get(i) == Some(&b'.') {
            is_float = true;
            i += 1;
            frac_digits = digits(&mut i);
        }
        if int_digits + frac_digits == 0 {
            return None;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            is_float = true;
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                return None;
            }
        }
        if i != b.len() {
            return None;
        }
        if !is_float {
            if let Ok(v) = s.parse::<i128>() {
                return Some(Num::Int(v));
            }
        }
        s.parse::<f64>().ok().and_then(Num::from_f64)
    }

    /// Exact total order across integers and floats.
    pub(crate) fn cmp(self, other: Num) -> Ordering {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a.cmp(&b),
            (Num::Float(a), Num::Float(b)) => a.total_cmp(&b),
            (Num::Int(a), Num::Float(b)) => cmp_int_float(a, b),
            (Num::Float(a), Num::Int(b)) => cmp_int_float(b, a).reverse(),
        }
    }

    /// The normalized key of this number (see [`index_key`]).
    fn key(self) -> String {
        match self {
            Num::Int(i) => format!("n:{i}"),
            Num::Float(f) => format!("n:{f:?}"),
        }
    }
}

/// Compares an integer with a normalized float (non-integral, or outside the `i128` range).
fn cmp_int_float(i: i128, f: f64) -> Ordering {
    if f >= I128_BOUND {
        return Ordering::Less;
    }
    if f < -I128_BOUND {
        return Ordering::Greater;
    }
    // `f` is in range and not integral, so `floor(f) < f < floor(f) + 1`.
    let floor = f.floor() as i128;
    if i <= floor {
        Ordering::Less
    } else {
        Ordering::Greater
    }
}

/// `Some(b)` for the exact strings `"true"` and `"false"`.
pub(crate) fn bool_str(s: &str) -> Option<bool> {
    match s {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Parses an ISO-8601 / RFC 3339 date-time or date. A date-time without offset and a plain
/// date are taken as UTC (a date means its midnight).
pub(crate) fn parse_instant(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    // Cheap pre-check, so ordinary strings never reach the parser.
    if b.len() < 10 || b.len() > 64 || b.get(4) != Some(&b'-') {
        return None;
    }
    if !b.iter().take(4).all(u8::is_ascii_digit) {
        return None;
    }
    if let Ok(t) = s.parse::<Timestamp>() {
        return Some(t);
    }
    if let Ok(dt) = s.parse::<civil::DateTime>() {
        return TimeZone::UTC.to_timestamp(dt).ok();
    }
    if let Ok(d) = s.parse::<civil::Date>() {
        return TimeZone::UTC
            .to_timestamp(d.to_datetime(civil::Time::midnight()))
            .ok();
    }
    None
}

/// A literal operand with its numeric and date interpretations computed once at compile time.
#[derive(Debug, Clone)]
pub(crate) struct Lit {
    /// The operand as written (placeholders already resolved).
    pub(crate) value: Value,
    /// Numeric value, for numbers and numeric strings.
    pub(crate) num: Option<Num>,
    /// Instant, for strings that parse as dates.
    pub(crate) instant: Option<Timestamp>,
}

impl Lit {
    /// Wraps a value, pre-computing its interpretations.
    pub(crate) fn new(value: Value) -> Lit {
        let (num, instant) = match &value {
            Value::Number(n) => (Num::from_number(n), None),
            Value::String(s) => (Num::parse(s), parse_instant(s)),
            _ => (None, None),
        };
        Lit {
            value,
            num,
            instant,
        }
    }
}

/// `_eq` between an item value and a literal (null/missing are handled by the caller).
pub(crate) fn eq_lit(field: &Value, lit: &Lit) -> bool {
    eq_lit_cached(field, &mut NumCache::default(), lit)
}

/// The numeric value of an item value, parsed at most once across several comparisons.
#[derive(Default)]
pub(crate) struct NumCache(Option<Option<Num>>);

impl NumCache {
    fn get(&mut self, field: &Value) -> Option<Num> {
        *self.0.get_or_insert_with(|| match field {
            Value::Number(n) => Num::from_number(n),
            Value::String(s) => Num::parse(s),
            _ => None,
        })
    }
}

/// [`eq_lit`] with the field's numeric value cached in `cache` (which must belong to `field`).
pub(crate) fn eq_lit_cached(field: &Value, cache: &mut NumCache, lit: &Lit) -> bool {
    match (field, &lit.value) {
        (Value::String(a), Value::String(b)) => {
            a == b
                || lit
                    .num
                    .is_some_and(|n| cache.get(field).is_some_and(|m| m.cmp(n).is_eq()))
        }
        (Value::Number(_) | Value::String(_), Value::Number(_))
        | (Value::Number(_), Value::String(_)) => lit
            .num
            .is_some_and(|n| cache.get(field).is_some_and(|m| m.cmp(n).is_eq())),
        _ => values_eq(field, &lit.value),
    }
}

/// `_eq` between two JSON values: the scalar rules, applied element-wise to arrays and
/// member-wise to objects.
pub(crate) fn values_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Bool(x), Value::String(s)) | (Value::String(s), Value::Bool(x)) => {
            bool_str(s) == Some(*x)
        }
        (Value::Number(x), Value::Number(y)) => num_eq(Num::from_number(x), Num::from_number(y)),
        (Value::Number(x), Value::String(s)) | (Value::String(s), Value::Number(x)) => {
            num_eq(Num::from_number(x), Num::parse(s))
        }
        (Value::String(x), Value::String(y)) => x == y || num_eq(Num::parse(x), Num::parse(y)),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| values_eq(v, w)))
        }
        _ => false,
    }
}

fn num_eq(a: Option<Num>, b: Option<Num>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a.cmp(b).is_eq())
}

/// Orders an item value against a literal; `None` when the two are not comparable.
pub(crate) fn order_lit(field: &Value, lit: &Lit) -> Option<Ordering> {
    match (field, &lit.value) {
        (Value::Number(x), Value::Number(_) | Value::String(_)) => {
            Some(Num::from_number(x)?.cmp(lit.num?))
        }
        (Value::String(s), Value::Number(_)) => Some(Num::parse(s)?.cmp(lit.num?)),
        (Value::String(s), Value::String(t)) => {
            if let Some(ti) = lit.instant {
                if let Some(fi) = parse_instant(s) {
                    return Some(fi.cmp(&ti));
                }
            }
            if let Some(n) = lit.num {
                if let Some(m) = Num::parse(s) {
                    return Some(m.cmp(n));
                }
            }
            Some(s.as_bytes().cmp(t.as_bytes()))
        }
        _ => None,
    }
}

/// Orders an item value (which must be a date string) against an instant.
pub(crate) fn order_instant(field: &Value, at: Timestamp) -> Option<Ordering> {
    match field {
        Value::String(s) => Some(parse_instant(s)?.cmp(&at)),
        _ => None,
    }
}

/// The normalized index key of a scalar: `index_key(a) == index_key(b)` exactly when `_eq`
/// considers the scalars `a` and `b` equal. `None` for arrays and objects.
///
/// Keys: `null`; `b:true` / `b:false` for booleans and the strings `"true"` / `"false"`;
/// `n:<number>` for numbers and numeric strings (integral values printed as integers, so
/// `5`, `5.0`, `"5"` and `"5.00"` all give `n:5`); `s:<string>` for any other string.
/// An index must key a missing field as `null` (see [`crate::filter::Filter::equality_terms`]).
pub fn index_key(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("null".to_owned()),
        Value::Bool(b) => Some(format!("b:{b}")),
        Value::Number(n) => Num::from_number(n).map(Num::key),
        Value::String(s) => Some(if let Some(n) = Num::parse(s) {
            n.key()
        } else if let Some(b) = bool_str(s) {
            format!("b:{b}")
        } else {
            format!("s:{s}")
        }),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Whether a value counts as empty for `_empty`: missing, null, `""`, `[]` or `{}`.
pub(crate) fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

/// Per-character Unicode lowercase of a string (the mapping the case-insensitive operators use).
pub(crate) fn lower(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// `lower(hay).starts_with(needle_lower)` without allocating.
pub(crate) fn starts_with_ci(hay: &str, needle_lower: &str) -> bool {
    let mut h = hay.chars().flat_map(char::to_lowercase);
    needle_lower.chars().all(|c| h.next() == Some(c))
}

/// `lower(hay).ends_with(needle_lower)` without allocating.
pub(crate) fn ends_with_ci(hay: &str, needle_lower: &str) -> bool {
    let mut h = hay.chars().rev().flat_map(|c| c.to_lowercase().rev());
    needle_lower.chars().rev().all(|c| h.next() == Some(c))
}

/// `lower(hay).contains(needle_lower)` without allocating.
pub(crate) fn contains_ci(hay: &str, needle_lower: &str) -> bool {
    if needle_lower.is_empty() {
        return true;
    }
    if hay.is_ascii() && needle_lower.is_ascii() {
        let n = needle_lower.as_bytes();
        return hay
            .as_bytes()
            .windows(n.len())
            .any(|w| w.eq_ignore_ascii_case(n));
    }
    let mut stream = hay.chars().flat_map(char::to_lowercase);
    loop {
        let mut probe = stream.clone();
        if needle_lower.chars().all(|c| probe.next() == Some(c)) {
            return true;
        }
        if stream.next().is_none() {
            return false;
        }
    }
}

/// Units of a `$NOW(...)` offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    fn parse(s: &str) -> Option<Unit> {
        Some(match s {
            "second" | "seconds" => Unit::Second,
            "minute" | "minutes" => Unit::Minute,
            "hour" | "hours" => Unit::Hour,
            "day" | "days" => Unit::Day,
            "week" | "weeks" => Unit::Week,
            "month" | "months" => Unit::Month,
            "year" | "years" => Unit::Year,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    fn seconds(self) -> Option<i64> {
        match self {
            Unit::Second => Some(1),
            Unit::Minute => Some(60),
            Unit::Hour => Some(3_600),
            Unit::Day => Some(86_400),
            Unit::Week => Some(604_800),
            Unit::Month | Unit::Year => None,
        }
    }
}

/// Largest accepted `$NOW` offset amount (about 1000 years in seconds is far below jiff's range).
const MAX_NOW_AMOUNT: i64 = 1_000_000;

/// `$NOW` or `$NOW(<+|->N unit)`: an instant relative to the evaluation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NowOffset {
    amount: i64,
    unit: Unit,
}

impl NowOffset {
    /// `None` if `s` is not a `$NOW` placeholder; `Some(Err(()))` if it is one but malformed.
    pub(crate) fn parse(s: &str) -> Option<Result<NowOffset, ()>> {
        if s == "$NOW" {
            return Some(Ok(NowOffset {
                amount: 0,
                unit: Unit::Second,
            }));
        }
        let inner = s.strip_prefix("$NOW(")?;
        Some(Self::parse_inner(inner).ok_or(()))
    }

    fn parse_inner(inner: &str) -> Option<NowOffset> {
        let inner = inner.strip_suffix(')')?.trim();
        let (negative, rest) = match inner.as_bytes().first() {
            Some(b'-') => (true, inner.get(1..)?),
            Some(b'+') => (false, inner.get(1..)?),
            _ => (false, inner),
        };
        let rest = rest.trim_start();
        let split = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (digits, unit) = rest.split_at(split);
        if digits.is_empty() || digits.len() > 9 {
            return None;
        }
        let amount: i64 = digits.parse().ok()?;
        if amount > MAX_NOW_AMOUNT {
            return None;
        }
        let unit = Unit::parse(unit.trim())?;
        Some(NowOffset {
            amount: if negative { -amount } else { amount },
            unit,
        })
    }

    /// The instant this offset denotes when the current time is `now`.
    pub(crate) fn at(self, now: Timestamp) -> Option<Timestamp> {
        if self.amount == 0 {
            return Some(now);
        }
        if let Some(secs) = self.unit.seconds() {
            let d = SignedDuration::from_secs(self.amount.checked_mul(secs)?);
            return now.checked_add(d).ok();
        }
        let span = match self.unit {
            Unit::Year => Span::new().try_years(self.amount).ok()?,
            _ => Span::new().try_months(self.amount).ok()?,
        };
        let dt = TimeZone::UTC.to_datetime(now).checked_add(span).ok()?;
        TimeZone::UTC.to_timestamp(dt).ok()
    }

    /// Canonical text, e.g. `$NOW(-1 day)` or `$NOW`.
    pub(crate) fn canonical(self) -> String {
        if self.amount == 0 {
            "$NOW".to_owned()
        } else {
            format!("$NOW({:+} {})", self.amount, self.unit.name())
        }
    }
}
