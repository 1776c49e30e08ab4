// Command csi-node-driver-registrar registers a CSI plugin with the kubelet
// through the kubelet's plugin registration protocol (pluginregistration/v1),
// taking the flags of the upstream sidecar that the DaemonSet passes.
//
// It asks the plugin its name, serves Registration on
// <plugin-registration-path>/<name>-reg.sock until told to stop, exits when
// the kubelet refuses the plugin, and answers /healthz while its socket exists.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registration.UnimplementedRegistrationServer
	driver   string
	endpoint string
	refused  chan string
}

func (r *registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, status *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if status.PluginRegistered {
		log.Printf("the kubelet registered %s", r.driver)
	} else {
		r.refused <- status.Error
	}
	return &registration.RegistrationStatusResponse{}, nil
}

// driverName asks the plugin for its name, waiting for it to answer: a plugin
// may take a while to start on a loaded node.
func driverName(ctx context.Context, address string) (string, error) {
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	identity := csi.NewIdentityClient(conn)
	for {
		call, cancel := context.WithTimeout(ctx, 10*time.Second)
		info, err := identity.GetPluginInfo(call, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return info.GetName(), nil
		}
		log.Printf("waiting for the plugin at %s: %v", address, err)
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

func main() {
	flag.Int("v", 0, "log verbosity (accepted for the upstream sidecar's flags)")
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the plugin's socket")
	endpoint := flag.String("kubelet-registration-path", "", "the plugin's socket as the kubelet sees it")
	registrationDir := flag.String("plugin-registration-path", "/registration", "the kubelet's plugin registration directory")
	httpEndpoint := flag.String("http-endpoint", "", "address of the /healthz endpoint; none if empty")
	flag.Parse()
	if *endpoint == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	name, err := driverName(ctx, *csiAddress)
	if err != nil {
		log.Fatalf("the plugin did not answer GetPluginInfo: %v", err)
	}
	socket := filepath.Join(*registrationDir, name+"-reg.sock")
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing the stale socket %s: %v", socket, err)
	}
	listener, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listening on %s: %v", socket, err)
	}
	defer os.Remove(socket)
	r := &registrar{driver: name, endpoint: *endpoint, refused: make(chan string, 1)}
	server := grpc.NewServer()
	registration.RegisterRegistrationServer(server, r)
	go func() { _ = server.Serve(listener) }()
	log.Printf("serving registration of %s at %s", name, socket)

	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			if _, err := os.Stat(socket); err != nil {
				http.Error(w, fmt.Sprintf("registration socket: %v", err), http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, "ok")
		})
		go func() { log.Print(http.ListenAndServe(*httpEndpoint, mux)) }()
	}

	select {
	case <-ctx.Done():
		log.Print("stopping")
		server.Stop()
	case reason := <-r.refused:
		server.Stop()
		_ = os.Remove(socket)
		log.Fatalf("the kubelet refused %s: %s", name, reason)
	}
}
