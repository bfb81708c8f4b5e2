"""Ground floor: spans and counters (time, bytes, rounds) for every layer; imports nothing of the project."""
