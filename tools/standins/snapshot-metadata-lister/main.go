// Command snapshot-metadata-lister prints a VolumeSnapshot's allocated block
// ranges, or those changed since another snapshot, as a backup application
// gets them: through the SnapshotMetadataService CR and the
// csi-snapshot-metadata sidecar, with the library the upstream project
// publishes for such clients (pkg/iterator). Its flags are the upstream
// example client's.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"
	"k8s.io/client-go/tools/clientcmd"
)

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "the cluster's kubeconfig")
	namespace := flag.String("n", "default", "the namespace of the VolumeSnapshots")
	snapshot := flag.String("s", "", "the VolumeSnapshot whose ranges to list")
	previous := flag.String("p", "", "list the ranges changed since this VolumeSnapshot")
	output := flag.String("o", "table", "output: table or json")
	account := flag.String("service-account", "", "the ServiceAccount whose token the sidecar checks")
	accountNamespace := flag.String("service-account-namespace", "", "that ServiceAccount's namespace")
	startingOffset := flag.Int64("starting-offset", 0, "the first byte offset to list")
	maxResults := flag.Int("max-results", 0, "ranges per message (0: the plugin's choice)")
	flag.Parse()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fail("kubeconfig %s: %v", *kubeconfig, err)
	}
	clients, err := iterator.BuildClients(config)
	if err != nil {
		fail("clients: %v", err)
	}
	var emitter iterator.IteratorEmitter = &iterator.TableEmitter{Writer: os.Stdout}
	if *output == "json" {
		emitter = &iterator.JSONEmitter{Writer: os.Stdout}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err = iterator.GetSnapshotMetadata(ctx, iterator.Args{
		Clients:          clients,
		Emitter:          emitter,
		Namespace:        *namespace,
		SnapshotName:     *snapshot,
		PrevSnapshotName: *previous,
		StartingOffset:   *startingOffset,
		MaxResults:       int32(*maxResults),
		SAName:           *account,
		SANamespace:      *accountNamespace,
	})
	if err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "snapshot-metadata-lister: "+format+"\n", args...)
	os.Exit(1)
}
