//! Protobuf messages walked, not decoded: their framing (keys, varints, lengths) checked and
//! their fields found in place, allocating nothing. For what prost would decode into far
//! more memory than the bytes it came in (OTLP exports, TestParse's lines), so that they
//! are counted and weighed first. Hand-written because prost decodes only whole messages:
//! its `encoding` module gives the varints, not a walk.

/// The length-delimited fields numbered `number` of a message's bytes, in order (merged
/// and repeated fields alike).
pub fn fields(bytes: &[u8], number: u64) -> impl Iterator<Item = Result<&[u8], &'static str>> {
    let mut all = Fields(bytes);
    std::iter::from_fn(move || {
        loop {
            match all.next_field() {
                Ok(Some((n, Some(value)))) if n == number => return Some(Ok(value)),
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(why) => {
                    all = Fields(&[]);
                    return Some(Err(why));
                }
            }
        }
    })
}

/// The fields of a protobuf message's bytes, in order.
#[derive(Debug)]
pub struct Fields<'a>(pub &'a [u8]);

/// A field's number and, for a length-delimited one, its bytes (`None` for a scalar,
/// skipped).
pub type Field<'a> = (u64, Option<&'a [u8]>);

impl<'a> Fields<'a> {
    /// The next field; `None` at the end.
    ///
    /// # Errors
    /// Why the bytes are no protobuf message.
    pub fn next_field(&mut self) -> Result<Option<Field<'a>>, &'static str> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err("a field numbered 0");
        }
        let value = match key & 7 {
            0 => {
                self.varint()?;
                None
            }
            1 => {
                self.take(8)?;
                None
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "a length past the end")?;
                Some(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                None
            }
            // Groups (3, 4) are deprecated and in no OTLP message; 6 and 7 are not wire types.
            _ => return Err("a group or an unknown wire type"),
        };
        Ok(Some((number, value)))
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        prost::encoding::decode_varint(&mut self.0).map_err(|_| "a malformed varint")
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], &'static str> {
        if len > self.0.len() {
            return Err("a length past the end");
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_order_merged_ones_too() {
        // Two `resource_logs`, then a field of another number and a varint.
        let mut bytes = Vec::new();
        for (number, value) in [(1_u32, &b"ab"[..]), (2, b"x"), (1, b"")] {
            prost::encoding::encode_key(
                number,
                prost::encoding::WireType::LengthDelimited,
                &mut bytes,
            );
            prost::encoding::encode_varint(value.len() as u64, &mut bytes);
            bytes.extend_from_slice(value);
        }
        prost::encoding::encode_key(1, prost::encoding::WireType::Varint, &mut bytes);
        prost::encoding::encode_varint(7, &mut bytes);
        let found: Vec<_> = fields(&bytes, 1).collect();
        assert_eq!(found, [Ok(&b"ab"[..]), Ok(&b""[..])]);
        // A length past the end ends the walk with why, once.
        let found: Vec<_> = fields(&[0x0a, 0x05, 0x01], 1).collect();
        assert_eq!(found, [Err("a length past the end")]);
    }
}
