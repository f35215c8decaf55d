//! A small builder for the handful of statements whose SQL differs only in placeholders
//! (`?` on SQLite, `$n` on PostgreSQL).

use sea_orm::{DbBackend, Statement, Value};

/// SQL text with its bound values, in order.
pub(super) struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    pub(super) fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            text: String::with_capacity(256),
            values: Vec::new(),
        }
    }

    /// Appends SQL text.
    pub(super) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub(super) fn bind(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        match self.backend {
            DbBackend::Postgres => {
                self.text.push('$');
                self.text.push_str(&self.values.len().to_string());
            }
            _ => self.text.push('?'),
        }
        self
    }

    /// Appends `(?, ?, ...)` bound to `values`.
    pub(super) fn bind_list<V: Into<Value>>(
        &mut self,
        values: impl IntoIterator<Item = V>,
    ) -> &mut Self {
        self.push("(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
        self.push(")")
    }

    pub(super) fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_engine() {
        for (backend, expected) in [
            (DbBackend::Sqlite, "a = ? AND b IN (?, ?)"),
            (DbBackend::Postgres, "a = $1 AND b IN ($2, $3)"),
        ] {
            let mut sql = Sql::new(backend);
            sql.push("a = ")
                .bind(1i64)
                .push(" AND b IN ")
                .bind_list([2i64, 3]);
            assert_eq!(sql.build().sql, expected);
        }
    }
}
