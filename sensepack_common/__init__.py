"""What the serving and training rooms share, below both (docs/design.md §2): the error a bad config raises
(`errors`) and the one logging setup with its JSON line format (`logs`)."""
