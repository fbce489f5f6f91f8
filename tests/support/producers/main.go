// Command producers turns a tar into a layer the way stargz-snapshotter's own library writes it:
// eStargz (gzip), or zstd:chunked through its zstdchunked compressor. It prints the annotations a
// converter puts on the layer descriptor as JSON. Test tooling for imagefs; built in GOPATH mode
// from Debian's golang-github-containerd-stargz-snapshotter-dev.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
)

// zstdCompression pairs the compressor and decompressor, as the library's converter does.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

func main() {
	format := flag.String("format", "estargz", "estargz or zstdchunked")
	chunk := flag.Int("chunk-size", 0, "bytes per chunk (0: the library's default)")
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: producers [-format estargz|zstdchunked] [-chunk-size N] IN.tar OUT")
		os.Exit(2)
	}
	if err := build(*format, *chunk, flag.Arg(0), flag.Arg(1)); err != nil {
		fmt.Fprintln(os.Stderr, "producers:", err)
		os.Exit(1)
	}
}

func build(format string, chunk int, in, out string) error {
	f, err := os.Open(in)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	var opts []estargz.Option
	if chunk > 0 {
		opts = append(opts, estargz.WithChunkSize(chunk))
	}
	annotations := map[string]string{}
	switch format {
	case "estargz":
	case "zstdchunked":
		opts = append(opts, estargz.WithCompression(&zstdCompression{
			&zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault, Metadata: annotations},
			&zstdchunked.Decompressor{}}))
	default:
		return fmt.Errorf("unknown format %q", format)
	}
	blob, err := estargz.Build(io.NewSectionReader(f, 0, st.Size()), opts...)
	if err != nil {
		return err
	}
	defer blob.Close()
	o, err := os.Create(out)
	if err != nil {
		return err
	}
	if _, err := io.Copy(o, blob); err != nil {
		return err
	}
	if err := o.Close(); err != nil {
		return err
	}
	annotations[estargz.TOCJSONDigestAnnotation] = blob.TOCDigest().String()
	annotations["diffID"] = blob.DiffID().String()
	return json.NewEncoder(os.Stdout).Encode(annotations)
}
