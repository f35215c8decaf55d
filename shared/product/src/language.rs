//! BCP 47 language tags, as used for the keys of product names and descriptions.
//!
//! The catalog accepts the subset of BCP 47 that product data uses: a language, an optional
//! script, an optional region and optional variants (`ko`, `en`, `zh-CN`, `zh-Hant-TW`,
//! `sr-Latn`, `es-419`, `de-CH-1996`). Extensions and private-use tags are refused, so every
//! stored key is something a translation system understands. Tags are compared and stored in
//! their canonical case (`zh-cn` becomes `zh-CN`), so one language cannot be stored twice.

use std::borrow::Cow;

/// The canonical form of `tag` (borrowed when `tag` is already in canonical case, as stored
/// keys and most requests' keys are: validation and normalization call this for every text
/// of every write), or why it is not a language tag this catalog accepts.
///
/// # Errors
/// A lowercase description of the first problem found.
pub fn canonicalize(tag: &str) -> Result<Cow<'_, str>, String> {
    if tag.is_empty() {
        return Err("language tag must not be empty".into());
    }
    if tag.len() > 35 {
        return Err("language tag is longer than 35 characters".into());
    }
    let mut subtags = tag.split('-').peekable();
    // Whether every subtag is in its canonical case already; which of them are there.
    let mut in_case = true;
    let (mut script_at, mut region_at) = (None, None);

    let language = subtags.next().unwrap_or_default();
    if !(is_alpha(language) && (2..=3).contains(&language.len())) {
        return Err(format!(
            "{tag:?} is not a BCP 47 language tag: it must start with a 2 or 3 letter language code"
        ));
    }
    in_case &= Case::Lower.holds(language);
    if let Some(script) = subtags.next_if(|s| s.len() == 4 && is_alpha(s)) {
        in_case &= Case::Title.holds(script);
        script_at = Some(1);
    }
    if let Some(region) =
        subtags.next_if(|s| (s.len() == 2 && is_alpha(s)) || (s.len() == 3 && is_digit(s)))
    {
        in_case &= Case::Upper.holds(region);
        region_at = Some(1 + usize::from(script_at.is_some()));
    }
    for variant in subtags {
        let valid = ((5..=8).contains(&variant.len()) && is_alphanumeric(variant))
            || (variant.len() == 4
                && variant.starts_with(|c: char| c.is_ascii_digit())
                && is_alphanumeric(variant));
        if !valid {
            return Err(format!(
                "{tag:?} is not a BCP 47 language tag: subtag {variant:?} is not a script, \
                 region or variant (extensions and private use are not accepted)"
            ));
        }
        in_case &= Case::Lower.holds(variant);
    }
    if in_case {
        return Ok(Cow::Borrowed(tag));
    }
    let mut out = String::with_capacity(tag.len());
    for (i, subtag) in tag.split('-').enumerate() {
        if i > 0 {
            out.push('-');
        }
        let case = if script_at == Some(i) {
            Case::Title
        } else if region_at == Some(i) {
            Case::Upper
        } else {
            Case::Lower
        };
        case.write(subtag, &mut out);
    }
    Ok(Cow::Owned(out))
}

/// The case of a subtag in canonical form.
#[derive(Debug, Clone, Copy)]
enum Case {
    Lower,
    /// The first letter upper case, the rest lower (scripts: `Hant`).
    Title,
    Upper,
}

impl Case {
    fn holds(self, subtag: &str) -> bool {
        let bytes = subtag.as_bytes();
        match self {
            Self::Lower => !bytes.iter().any(u8::is_ascii_uppercase),
            Self::Upper => !bytes.iter().any(u8::is_ascii_lowercase),
            Self::Title => {
                !bytes.first().is_some_and(u8::is_ascii_lowercase)
                    && !bytes.iter().skip(1).any(u8::is_ascii_uppercase)
            }
        }
    }

    fn write(self, subtag: &str, out: &mut String) {
        for (i, c) in subtag.chars().enumerate() {
            out.push(match self {
                Self::Upper => c.to_ascii_uppercase(),
                Self::Title if i == 0 => c.to_ascii_uppercase(),
                Self::Lower | Self::Title => c.to_ascii_lowercase(),
            });
        }
    }
}

fn is_alpha(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic())
}

fn is_digit(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_alphanumeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::canonicalize;

    #[test]
    fn common_tags_are_accepted_in_canonical_case() {
        for (input, canonical) in [
            ("ko", "ko"),
            ("en", "en"),
            ("ja", "ja"),
            ("zh-CN", "zh-CN"),
            ("zh-cn", "zh-CN"),
            ("ZH-hant-tw", "zh-Hant-TW"),
            ("sr-Latn", "sr-Latn"),
            ("es-419", "es-419"),
            ("de-CH-1996", "de-CH-1996"),
            ("fil", "fil"),
        ] {
            assert_eq!(canonicalize(input).as_deref(), Ok(canonical), "{input}");
        }
    }

    #[test]
    fn a_tag_in_canonical_case_is_borrowed_and_any_other_rewritten() {
        for tag in [
            "ko",
            "zh-CN",
            "zh-Hant-TW",
            "sr-Latn",
            "es-419",
            "de-CH-1996",
        ] {
            assert!(
                matches!(canonicalize(tag), Ok(Cow::Borrowed(t)) if t == tag),
                "{tag}"
            );
        }
        for (tag, canonical) in [
            ("KO", "ko"),
            ("zh-Hant-tw", "zh-Hant-TW"),
            ("zh-HANT-TW", "zh-Hant-TW"),
            ("sr-latn", "sr-Latn"),
            ("DE-ch-1996", "de-CH-1996"),
        ] {
            assert!(
                matches!(canonicalize(tag), Ok(Cow::Owned(ref t)) if t == canonical),
                "{tag}"
            );
        }
    }

    #[test]
    fn malformed_tags_are_refused_with_a_reason() {
        for input in [
            "",
            "k",
            "korean",
            "en_US",
            "en-",
            "-en",
            "en--US",
            "en-U",
            "12",
            "en-x-private",
            "en-US-u-ca-gregory",
            "한국어",
        ] {
            let error = canonicalize(input).expect_err(input);
            assert!(!error.is_empty());
        }
    }
}
