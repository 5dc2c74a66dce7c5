"""Everything that crosses a process boundary: msgspec Structs, versioned."""
