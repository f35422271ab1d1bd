// Command interop exercises the registry from Go, exactly as Go services do today.
//
//	interop call     -etcd URL -target T -n N [-expect K]   dial etcd:///T with round_robin, make
//	                                            N SayHello calls (then more, up to 10s, until K
//	                                            servers answered), print
//	                                            {"servers":{addr:count},"failed":n}
//	interop register -etcd URL -target T -addr A   add A under T with endpoints.Manager
//	interop seed     -etcd URL -target T -n N -ttl S   simulate N servers that each register
//	                                            themselves as the Go seeds do: own client, own
//	                                            lease, KeepAlive, AddEndpoint; prints "ready"
//	                                            and runs until stdin closes
//	interop kratos   -etcd URL -name NAME -n N [-wait D] [-expect K]   go-kratos client: kratos' etcd
//	                                            registry + grpc.DialInsecure("discovery:///NAME"),
//	                                            N SayHello calls, prints the same JSON as call;
//	                                            -wait D first waits up to D for an instance
//	interop kratos-register -etcd URL -name NAME -id ID -addr A [-version V]   register one
//	                                            instance (endpoints ["grpc://A"]) with kratos'
//	                                            own etcd Registry.Register; prints "ready", and
//	                                            Deregisters when stdin closes
//	interop dump     -etcd URL -prefix P        print every key=value under prefix P
//	interop consul   -consul ADDR -name NAME -n N [-tag T] [-passing=false]   a Consul user's
//	                                            client: blocking Health().Service(NAME, passing)
//	                                            queries feeding grpc-go (consul:///NAME) with
//	                                            round_robin, N SayHello calls, same JSON as call
//	interop consul-watch -consul ADDR -name NAME [-tag T] [-passing=false]   print each change
//	                                            of the instance set as a JSON line until stdin
//	                                            closes
//	interop serve    -listen A -min-time D      a grpc-go Greeter server whose keep-alive
//	                                            enforcement allows one ping per D (default policy
//	                                            otherwise); prints "ready ADDR" and "accepted N"
//	                                            per connection until stdin closes
//
// It needs no generated code: SayHello is invoked with a raw-bytes codec and the protobuf
// wire format is read with protowire.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"time"

	kratosetcd "github.com/go-kratos/kratos/contrib/registry/etcd/v2"
	"github.com/go-kratos/kratos/v2/registry"
	kgrpc "github.com/go-kratos/kratos/v2/transport/grpc"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
	"go.etcd.io/etcd/client/v3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
)

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// helloRequest encodes helloworld.HelloRequest{name}.
func helloRequest(name string) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendString(b, name)
}

// replyServer reads field 2 (server) of helloworld.HelloReply.
func replyServer(b []byte) string {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ""
		}
		b = b[n:]
		if typ != protowire.BytesType {
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return ""
			}
			b = b[m:]
			continue
		}
		v, m := protowire.ConsumeString(b)
		if m < 0 {
			return ""
		}
		if num == 2 {
			return v
		}
		b = b[m:]
	}
	return ""
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: interop call|register|seed|kratos|kratos-register|dump|consul|consul-watch|serve [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	etcd := fs.String("etcd", "http://127.0.0.1:2379", "etcd endpoint")
	target := fs.String("target", "services/default/greeter", "registry target")
	n := fs.Int("n", 30, "calls to make")
	addr := fs.String("addr", "", "address to register")
	ttl := fs.Int64("ttl", 10, "lease TTL in seconds (seed)")
	name := fs.String("name", "greeter", "kratos service name (kratos, kratos-register)")
	id := fs.String("id", "", "kratos instance id (kratos-register)")
	version := fs.String("version", "", "kratos instance version (kratos-register)")
	wait := fs.Duration("wait", 0, "wait up to this long for an instance to be discovered (kratos)")
	expect := fs.Int("expect", 0, "after the n calls, keep calling (one every 20ms, up to 10s) until this many servers answered: a balancer picks only connections already up, and on a loaded machine the last may come up after the first n calls (call, kratos)")
	prefix := fs.String("prefix", "/", "key prefix (dump)")
	consul := fs.String("consul", "127.0.0.1:8500", "Consul HTTP address (consul, consul-watch)")
	tag := fs.String("tag", "", "only instances with this tag (consul, consul-watch)")
	listen := fs.String("listen", "127.0.0.1:0", "address to serve on (serve)")
	minTime := fs.Duration("min-time", 5*time.Minute, "keep-alive enforcement MinTime (serve)")
	passing := fs.Bool("passing", true, "only passing instances, Health().Service; false lists the catalog (consul, consul-watch)")
	_ = fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "serve":
		serve(*listen, *minTime)
		return
	case "consul":
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		consulCall(ctx, *consul, *name, *tag, *passing, *n)
		return
	case "consul-watch":
		consulWatch(*consul, *name, *tag, *passing)
		return
	}
	if os.Args[1] == "seed" {
		seed(*etcd, *target, *n, *ttl)
		return
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{*etcd}, DialTimeout: 5 * time.Second})
	if err != nil {
		fail(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	switch os.Args[1] {
	case "register":
		em, err := endpoints.NewManager(cli, *target)
		if err != nil {
			fail(err)
		}
		key := *target + "/" + *addr
		if err := em.AddEndpoint(ctx, key, endpoints.Endpoint{Addr: *addr, Metadata: map[string]string{"writer": "go"}}); err != nil {
			fail(err)
		}
	case "call":
		builder, err := resolver.NewBuilder(cli)
		if err != nil {
			fail(err)
		}
		// grpc-go sends the dial target's path ("services/ns/name") as :authority; HTTP/2 servers
		// built on hyper (tonic) reject an authority with slashes, so name the service instead.
		conn, err := grpc.NewClient("etcd:///"+*target,
			grpc.WithResolvers(builder),
			grpc.WithAuthority(path.Base(*target)),
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.WaitForReady(true)))
		if err != nil {
			fail(err)
		}
		defer conn.Close()
		callN(ctx, conn, *n, *expect)
	case "kratos":
		kratosCall(ctx, cli, *name, *n, *expect, *wait)
	case "kratos-register":
		kratosRegister(ctx, cli, *name, *id, *version, *addr)
	case "dump":
		resp, err := cli.Get(ctx, *prefix, clientv3.WithPrefix())
		if err != nil {
			fail(err)
		}
		for _, kv := range resp.Kvs {
			fmt.Printf("%s=%s\n", kv.Key, kv.Value)
		}
	default:
		fail(fmt.Errorf("unknown command %q", os.Args[1]))
	}
}

// callN makes n SayHello calls on conn, then more (one every 20ms, for up to 10s) until expect
// servers answered, and prints {"servers":{addr:count},"failed":n}.
func callN(ctx context.Context, conn *grpc.ClientConn, n, expect int, opts ...grpc.CallOption) {
	counts := map[string]int{}
	failed := 0
	call := func() {
		req := helloRequest("go")
		var resp []byte
		callCtx, done := context.WithTimeout(ctx, 10*time.Second)
		err := conn.Invoke(callCtx, "/helloworld.Greeter/SayHello", &req, &resp, opts...)
		done()
		if err != nil {
			if failed == 0 {
				fmt.Fprintln(os.Stderr, "interop: first failed call:", err)
			}
			failed++
			return
		}
		counts[replyServer(resp)]++
	}
	for i := 0; i < n; i++ {
		call()
	}
	for deadline := time.Now().Add(10 * time.Second); len(counts) < expect && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		call()
	}
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{"servers": counts, "failed": failed})
}

// kratosCall dials discovery:///name exactly as a go-kratos client does (kratos' etcd registry,
// kratos' gRPC transport with its discovery resolver and selector balancer) and makes n calls.
func kratosCall(ctx context.Context, cli *clientv3.Client, name string, n, expect int, wait time.Duration) {
	reg := kratosetcd.New(cli)
	if wait > 0 {
		deadline := time.Now().Add(wait)
		for {
			ins, err := reg.GetService(ctx, name)
			if err == nil && len(ins) > 0 {
				break
			}
			if time.Now().After(deadline) {
				fail(fmt.Errorf("no instance of %q discovered within %s (last error: %v)", name, wait, err))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	conn, err := kgrpc.DialInsecure(ctx,
		kgrpc.WithEndpoint("discovery:///"+name),
		kgrpc.WithDiscovery(reg))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	callN(ctx, conn, n, expect, grpc.ForceCodec(rawCodec{}))
}

// kratosRegister registers one instance with kratos' own etcd Registry, as kratos.App does on
// start, keeps it (kratos' lease KeepAlive) until stdin closes, then Deregisters it.
func kratosRegister(ctx context.Context, cli *clientv3.Client, name, id, version, addr string) {
	reg := kratosetcd.New(cli)
	ins := &registry.ServiceInstance{
		ID:        id,
		Name:      name,
		Version:   version,
		Endpoints: []string{"grpc://" + addr},
	}
	if err := reg.Register(ctx, ins); err != nil {
		fail(err)
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := reg.Deregister(dctx, ins); err != nil {
		fail(err)
	}
}

// seed runs n self-registering servers, each exactly as a seed service registers itself today.
func seed(etcd, target string, n int, ttl int64) {
	ctx := context.Background()
	clients := make([]*clientv3.Client, 0, n)
	for i := 0; i < n; i++ {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd}, DialTimeout: 5 * time.Second})
		if err != nil {
			fail(err)
		}
		clients = append(clients, cli)
		lease, err := cli.Grant(ctx, ttl)
		if err != nil {
			fail(err)
		}
		alive, err := cli.KeepAlive(ctx, lease.ID)
		if err != nil {
			fail(err)
		}
		go func() {
			for range alive {
			}
		}()
		em, err := endpoints.NewManager(cli, target)
		if err != nil {
			fail(err)
		}
		addr := fmt.Sprintf("10.%d.%d.%d:50051", i/65536, (i/256)%256, i%256)
		if err := em.AddEndpoint(ctx, target+"/"+addr, endpoints.Endpoint{Addr: addr}, clientv3.WithLease(lease.ID)); err != nil {
			fail(err)
		}
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, cli := range clients {
		_ = cli.Close()
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "interop:", err)
	os.Exit(1)
}
