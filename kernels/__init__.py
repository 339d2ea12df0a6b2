"""GEMMs over the Spense layout (docs/FORMAT.md). ``reference`` is the pure PyTorch oracle and CPU path."""
