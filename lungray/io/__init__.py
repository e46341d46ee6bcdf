"""Reading archives: listing local and s3:// trees, and decoding their files."""
