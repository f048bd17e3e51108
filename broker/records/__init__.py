"""records: a held record's states and the one function that changes them."""
