// tlogcheck: check a vouch transparency log with Go's golang.org/x/mod/sumdb/tlog and
// sumdb/note, an implementation independent of vouch's.
//
// Usage: tlogcheck LOGDIR LOG-VKEY WITNESS-NAME WITNESS-PUBKEY-BASE64 PROOFS-FILE
//
// It opens the checkpoint with note.Open under the log's vkey; rebuilds every stored hash from
// the entry bundles with tlog.StoredHashes and compares every tile (tlog.NewTiles,
// tlog.ReadTileData) and every entry bundle byte for byte with vouch's files (at C2SP paths:
// Go's sumdb path tile/8/L/N is tile/L/N there); checks the tree hash, every leaf through
// tlog.TileHashReader over vouch's tiles with ProveRecord/CheckRecord, the Rust-made proofs in
// PROOFS-FILE with CheckRecord/CheckTree, and the witness's cosignature/v1 with crypto/ed25519.
package main

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "tlogcheck: "+format+"\n", args...)
	os.Exit(1)
}

func c2spIndex(n int64) string {
	s := fmt.Sprintf("%03d", n%1000)
	for n >= 1000 {
		n /= 1000
		s = fmt.Sprintf("x%03d/%s", n%1000, s)
	}
	return s
}

func c2spPath(t tlog.Tile) string {
	p := fmt.Sprintf("tile/%d/%s", t.L, c2spIndex(t.N))
	if t.W != 1<<uint(t.H) {
		p += fmt.Sprintf(".p/%d", t.W)
	}
	return p
}

type dirTiles struct{ dir string }

func (d dirTiles) Height() int { return 8 }

func (d dirTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	var out [][]byte
	for _, t := range tiles {
		b, err := os.ReadFile(filepath.Join(d.dir, c2spPath(t)))
		if err != nil {
			full := t
			full.W = 256
			b, err = os.ReadFile(filepath.Join(d.dir, c2spPath(full)))
			if err != nil {
				return nil, err
			}
			b = b[:t.W*32]
		}
		out = append(out, b)
	}
	return out, nil
}

func (d dirTiles) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

func readEntries(dir string, size int64) [][]byte {
	var entries [][]byte
	for n := int64(0); n*256 < size; n++ {
		w := size - n*256
		if w > 256 {
			w = 256
		}
		p := "tile/entries/" + c2spIndex(n)
		if w < 256 {
			p += fmt.Sprintf(".p/%d", w)
		}
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			fail("%v", err)
		}
		var bundle [][]byte
		for len(b) > 0 {
			l := int(binary.BigEndian.Uint16(b))
			bundle = append(bundle, b[2:2+l])
			b = b[2+l:]
		}
		if int64(len(bundle)) != w {
			fail("%s holds %d entries, want %d", p, len(bundle), w)
		}
		entries = append(entries, bundle...)
	}
	return entries
}

func parseProof(fields []string) []tlog.Hash {
	var p []tlog.Hash
	for _, f := range fields {
		h, err := tlog.ParseHash(f)
		if err != nil {
			fail("proof hash %q: %v", f, err)
		}
		p = append(p, h)
	}
	return p
}

func main() {
	if len(os.Args) != 6 {
		fail("usage: tlogcheck LOGDIR LOG-VKEY WITNESS-NAME WITNESS-PUBKEY PROOFS")
	}
	dir, vkey, wname, wpub, proofs := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5]
	msg, err := os.ReadFile(filepath.Join(dir, "checkpoint"))
	if err != nil {
		fail("%v", err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		fail("log vkey: %v", err)
	}
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		fail("note.Open: %v", err)
	}
	lines := strings.Split(n.Text, "\n")
	if len(lines) != 4 || lines[3] != "" {
		fail("checkpoint text %q", n.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		fail("size: %v", err)
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		fail("root: %v", err)
	}

	// Rebuild the tree from the entries alone, then compare tiles and bundles.
	entries := readEntries(dir, size)
	var stored []tlog.Hash
	hr := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for i, x := range idx {
			out[i] = stored[x]
		}
		return out, nil
	})
	for i, e := range entries {
		hs, err := tlog.StoredHashes(int64(i), e, hr)
		if err != nil {
			fail("StoredHashes(%d): %v", i, err)
		}
		stored = append(stored, hs...)
	}
	th, err := tlog.TreeHash(size, hr)
	if err != nil || th != root {
		fail("tree hash from the entries %v, checkpoint %v (%v)", th, root, err)
	}
	tiles := tlog.NewTiles(8, 0, size)
	compared := 0
	for _, t := range tiles {
		want, err := tlog.ReadTileData(t, hr)
		if err != nil {
			fail("ReadTileData: %v", err)
		}
		if strings.Replace(t.Path(), "tile/8/", "tile/", 1) != c2spPath(t) {
			fail("path %s vs %s", t.Path(), c2spPath(t))
		}
		// Go lists every partial width up to the tree's; vouch keeps those of the sizes it
		// published checkpoints for (until the tile is full). Those it has must match too.
		final := t.W == 256 || int64(t.W) == size>>(8*uint(t.L))-t.N*256
		got, err := os.ReadFile(filepath.Join(dir, c2spPath(t)))
		if os.IsNotExist(err) && !final {
			continue
		}
		if err != nil || !bytes.Equal(got, want) {
			fail("tile %s differs from Go's (%v)", c2spPath(t), err)
		}
		compared++
	}

	// Every leaf through vouch's tiles, authenticated by Go's TileHashReader.
	thr := tlog.TileHashReader(tlog.Tree{N: size, Hash: root}, dirTiles{dir})
	for i, e := range entries {
		p, err := tlog.ProveRecord(size, int64(i), thr)
		if err != nil {
			fail("ProveRecord(%d): %v", i, err)
		}
		if err := tlog.CheckRecord(p, size, root, int64(i), tlog.RecordHash(e)); err != nil {
			fail("CheckRecord(%d): %v", i, err)
		}
	}

	// Proofs made by vouch.
	f, err := os.Open(proofs)
	if err != nil {
		fail("%v", err)
	}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	records, trees := 0, 0
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		switch fields[0] {
		case "record":
			i, _ := strconv.ParseInt(fields[1], 10, 64)
			if err := tlog.CheckRecord(parseProof(fields[2:]), size, root, i, tlog.RecordHash(entries[i])); err != nil {
				fail("vouch's inclusion proof of %d: %v", i, err)
			}
			records++
		case "tree":
			old, _ := strconv.ParseInt(fields[1], 10, 64)
			oldRoot, err := tlog.ParseHash(fields[2])
			if err != nil {
				fail("%v", err)
			}
			if err := tlog.CheckTree(parseProof(fields[3:]), size, root, old, oldRoot); err != nil {
				fail("vouch's consistency proof from %d: %v", old, err)
			}
			trees++
		}
	}

	// The witness's cosignature/v1 line.
	pub, err := base64.StdEncoding.DecodeString(wpub)
	if err != nil || len(pub) != 32 {
		fail("witness key %q", wpub)
	}
	keyHash := sha256.Sum256(append([]byte(wname+"\n\x04"), pub...))
	cosigned := false
	for _, s := range n.UnverifiedSigs {
		if s.Name != wname {
			continue
		}
		raw, _ := base64.StdEncoding.DecodeString(s.Base64)
		if len(raw) != 4+8+64 || !bytes.Equal(raw[:4], keyHash[:4]) {
			fail("cosignature of %s: key id or length", wname)
		}
		ts := binary.BigEndian.Uint64(raw[4:12])
		m := append([]byte(fmt.Sprintf("cosignature/v1\ntime %d\n", ts)), []byte(n.Text)...)
		if !ed25519.Verify(ed25519.PublicKey(pub), m, raw[12:]) {
			fail("cosignature of %s does not verify", wname)
		}
		cosigned = true
	}
	if !cosigned {
		fail("no cosignature by %s", wname)
	}
	fmt.Printf("ok: %d leaves, %d tiles, %d inclusion and %d consistency proofs, cosigned by %s\n",
		len(entries), compared, records, trees, wname)
}
