// bundle-validate runs operator-framework's own validators over an OLM bundle
// directory: the default bundle checks plus the optional suite that
// `operator-sdk bundle validate --select-optional suite=operatorframework`
// selects. It prints every finding and exits 1 on any error.
package main

import (
	"fmt"
	"os"

	"github.com/operator-framework/api/pkg/manifests"
	"github.com/operator-framework/api/pkg/validation"
	validator "github.com/operator-framework/api/pkg/validation/interfaces"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: bundle-validate BUNDLE_DIR K8S_VERSION")
		os.Exit(2)
	}
	bundle, err := manifests.GetBundleFromDir(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot load the bundle:", err)
		os.Exit(1)
	}
	objs := append(bundle.ObjectsToValidate(), map[string]string{"k8s-version": os.Args[2]})
	suite := validator.Validators{
		validation.ClusterServiceVersionValidator,
		validation.CustomResourceDefinitionValidator,
		validation.BundleValidator,
		validation.OperatorHubV2Validator,
		validation.StandardCategoriesValidator,
		validation.StandardCapabilitiesValidator,
		validation.GoodPracticesValidator,
		validation.AlphaDeprecatedAPIsValidator,
		validation.ObjectValidator,
	}
	failed := false
	for _, result := range suite.Validate(objs...) {
		for _, e := range result.Errors {
			fmt.Printf("ERROR %s: %s\n", result.Name, e.Error())
			failed = true
		}
		for _, w := range result.Warnings {
			fmt.Printf("WARN %s: %s\n", result.Name, w.Error())
		}
	}
	if failed {
		os.Exit(1)
	}
	fmt.Println("bundle is valid")
}
