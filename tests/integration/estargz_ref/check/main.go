// Reads an eStargz blob with the reference library: checks the TOC digest, then reads
// every regular file chunk by chunk through the library's verifiers.
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: %s BLOB TOC-DIGEST", os.Args[0])
	}
	f, err := os.Open(os.Args[1])
	if err != nil {
		fail("%v", err)
	}
	st, err := f.Stat()
	if err != nil {
		fail("%v", err)
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		fail("open: %v", err)
	}
	v, err := r.VerifyTOC(digest.Digest(os.Args[2]))
	if err != nil {
		fail("verify TOC: %v", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		fail("no root")
	}
	files, chunks, total := 0, 0, int64(0)
	var walk func(dir string, e *estargz.TOCEntry)
	walk = func(dir string, e *estargz.TOCEntry) {
		e.ForeachChild(func(base string, child *estargz.TOCEntry) bool {
			name := path.Join(dir, base)
			if child.Type == "dir" {
				walk(name, child)
				return true
			}
			if child.Type != "reg" || child.Size == 0 {
				return true
			}
			// A hard link's entry is its target's: read the file by its own name.
			name = child.Name
			ra, err := r.OpenFile(name)
			if err != nil {
				fail("open %s: %v", name, err)
			}
			whole := sha256.New()
			for off := int64(0); off < child.Size; {
				ce, ok := r.ChunkEntryForOffset(name, off)
				if !ok {
					fail("%s: no chunk at %d", name, off)
				}
				ver, err := v.Verifier(ce)
				if err != nil {
					fail("%s: %v", name, err)
				}
				data := make([]byte, ce.ChunkSize)
				if _, err := ra.ReadAt(data, ce.ChunkOffset); err != nil && err != io.EOF {
					fail("%s: read at %d: %v", name, ce.ChunkOffset, err)
				}
				ver.Write(data)
				if !ver.Verified() {
					fail("%s: chunk at %d fails its digest", name, ce.ChunkOffset)
				}
				whole.Write(data)
				chunks++
				off = ce.ChunkOffset + ce.ChunkSize
			}
			if child.Digest != "" && child.Digest != fmt.Sprintf("sha256:%x", whole.Sum(nil)) {
				fail("%s: file digest mismatch", name)
			}
			files++
			total += child.Size
			return true
		})
	}
	walk("", root)
	fmt.Printf("{\"files\": %d, \"chunks\": %d, \"bytes\": %d}\n", files, chunks, total)
}
