"""Reference architectures (torch) and the code that marks/inserts adaptable parameters."""
