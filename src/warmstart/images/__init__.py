"""Container images: registry client, content store, safe unpacking, eStargz, lazy mounts."""
