//! Rows for PostgreSQL's `COPY ... FROM STDIN (FORMAT binary)`, for replay's
//! bulk loads. Binary, because parsing text (UUIDs, numerics, timestamps)
//! was most of the server's work in a text `COPY`. Each value is written by
//! sqlx's own encoder for its type, the bytes a bound parameter would carry.

use sqlx::encode::IsNull;
use sqlx::postgres::PgArgumentBuffer;
use sqlx::{Encode, PgConnection, Postgres};

pub struct CopyRows {
    buf: PgArgumentBuffer,
    columns: i16,
    in_row: i16,
    rows: usize,
}

impl CopyRows {
    /// Rows of `columns` values each; room for `bytes` before the buffer grows.
    pub fn new(columns: i16, bytes: usize) -> Self {
        let mut buf = PgArgumentBuffer::default();
        buf.reserve(bytes);
        // Signature, flags (no OIDs), header extension length.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        CopyRows { buf, columns, in_row: 0, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The next value of the current row; `None` is NULL.
    pub fn value<'q, T: Encode<'q, Postgres>>(&mut self, value: &T) -> Result<&mut Self, sqlx::Error> {
        if self.in_row == 0 {
            self.buf.extend_from_slice(&self.columns.to_be_bytes());
        }
        if self.in_row == self.columns {
            return Err(sqlx::Error::Protocol(format!("a COPY row has more than {} values", self.columns)));
        }
        self.in_row += 1;
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let length = match value.encode_by_ref(&mut self.buf).map_err(sqlx::Error::Encode)? {
            IsNull::Yes => -1,
            IsNull::No => i32::try_from(self.buf.len() - at - 4)
                .map_err(|_| sqlx::Error::Protocol("a COPY value longer than 2 GiB".into()))?,
        };
        self.buf[at..at + 4].copy_from_slice(&length.to_be_bytes());
        Ok(self)
    }

    pub fn end_row(&mut self) -> Result<(), sqlx::Error> {
        if self.in_row != self.columns {
            return Err(sqlx::Error::Protocol(format!("a COPY row has {} values, not {}", self.in_row, self.columns)));
        }
        self.in_row = 0;
        self.rows += 1;
        Ok(())
    }

    /// Sends the rows with `statement` (`COPY table (columns) FROM STDIN
    /// (FORMAT binary)`); returns the rows copied.
    pub async fn send(mut self, conn: &mut PgConnection, statement: &str) -> Result<u64, sqlx::Error> {
        if self.in_row != 0 {
            return Err(sqlx::Error::Protocol("a COPY row was left unfinished".into()));
        }
        if self.rows == 0 {
            return Ok(0);
        }
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        let mut copy = conn.copy_in_raw(statement).await?;
        if let Err(e) = copy.send(std::mem::take(&mut *self.buf)).await {
            // The send's error is the one to report; the abort only frees the connection.
            let _ = copy.abort("the rows could not be sent").await;
            return Err(e);
        }
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_framed_as_postgres_binary_copy() {
        let mut rows = CopyRows::new(2, 0);
        rows.value(&7i64).unwrap().value(&None::<String>).unwrap();
        rows.end_row().unwrap();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&[0, 2, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&rows.buf[..], &expected[..]);
        assert_eq!(rows.rows(), 1);
    }

    #[test]
    fn a_row_must_have_every_column() {
        let mut rows = CopyRows::new(2, 0);
        rows.value(&1i64).unwrap();
        assert!(rows.end_row().is_err());
        rows.value(&2i64).unwrap();
        assert!(rows.value(&3i64).is_err(), "a third value in a two-column row");
    }
}
