"""The FUSE side: :mod:`.tree` is the inode table built from the image graph, :mod:`.operations`
answers pyfuse3's requests from it, :mod:`.mount` runs a mount's lifetime."""
