"""raysd's built-in search spaces; the wheel ships this folder as the package raysd.search_spaces."""
