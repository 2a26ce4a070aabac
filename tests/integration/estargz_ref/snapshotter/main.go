// A minimal stargz snapshotter daemon: the reference lazy-pulling filesystem exposed to
// containerd as a proxy snapshot plugin over a unix socket.
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintf(os.Stderr, "usage: %s ROOT SOCKET\n", os.Args[0])
		os.Exit(2)
	}
	root, socket := os.Args[1], os.Args[2]
	ctx := context.Background()
	cfg := fsconfig.Config{NoPrometheus: true}
	// Registries on loopback speak plain HTTP; every host gets a real HTTP client.
	hosts := func(spec reference.Spec) ([]docker.RegistryHost, error) {
		client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
		return docker.ConfigureDefaultRegistries(
			docker.WithPlainHTTP(docker.MatchLocalhost),
			docker.WithClient(client),
		)(spec.Hostname())
	}
	fs, err := stargzfs.NewFilesystem(root+"/stargz", cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "filesystem: %v\n", err)
		os.Exit(1)
	}
	sn, err := snapshot.NewSnapshotter(ctx, root+"/snapshotter", fs, snapshot.AsynchronousRemove)
	if err != nil {
		fmt.Fprintf(os.Stderr, "snapshotter: %v\n", err)
		os.Exit(1)
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "listen: %v\n", err)
		os.Exit(1)
	}
	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-done
		rpc.Stop()
	}()
	if err := rpc.Serve(l); err != nil {
		fmt.Fprintf(os.Stderr, "serve: %v\n", err)
	}
	sn.Close()
}
