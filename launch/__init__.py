"""Process bootstrap: who am I (rank, world), whoever started me."""
