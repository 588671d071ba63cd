// Command trivydb writes a bbolt database from a JSON list of entries.
//
// It is the only part of the offline Trivy DB build that needs Go: bbolt is
// Trivy's storage format. The layout (which buckets, which values) is decided by
// sandbox/trivydb.py; this program only writes it:
//
//	trivydb -in entries.json -out trivy.db
//
// entries.json: [{"path": ["bucket", "nested bucket"], "key": "k", "value": "<bytes as text>"}]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
)

type entry struct {
	Path  []string `json:"path"`
	Key   string   `json:"key"`
	Value string   `json:"value"`
}

func main() {
	in := flag.String("in", "", "JSON list of entries")
	out := flag.String("out", "", "bbolt file to write (replaced)")
	flag.Parse()
	if err := run(*in, *out); err != nil {
		fmt.Fprintln(os.Stderr, "trivydb:", err)
		os.Exit(1)
	}
}

func run(in, out string) error {
	data, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	var entries []entry
	if err := json.Unmarshal(data, &entries); err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	_ = os.Remove(out)
	db, err := bolt.Open(out, 0o644, &bolt.Options{Timeout: 5 * time.Second, NoSync: true})
	if err != nil {
		return err
	}
	defer db.Close()
	// One transaction per entry: a large transaction lays out its pages in Go map
	// order, so the same entries would give different bytes from run to run.
	for _, e := range entries {
		if err := db.Update(func(tx *bolt.Tx) error { return put(tx, e) }); err != nil {
			return err
		}
	}
	return db.Sync()
}

func put(tx *bolt.Tx, e entry) error {
	if len(e.Path) == 0 {
		return fmt.Errorf("entry %q has no bucket path", e.Key)
	}
	b, err := tx.CreateBucketIfNotExists([]byte(e.Path[0]))
	if err != nil {
		return err
	}
	for _, name := range e.Path[1:] {
		if b, err = b.CreateBucketIfNotExists([]byte(name)); err != nil {
			return err
		}
	}
	return b.Put([]byte(e.Key), []byte(e.Value))
}
